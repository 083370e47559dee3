"""`dinor1 predict`: box prompts (same image or an exemplar), text prompts, the default choice
of detections and resolution, and bad inputs."""

import json

import pytest
import yaml
from PIL import Image

from dinor1.api import PER_PROMPT, best_per_prompt, duplicate
from dinor1.cli import main
from tests.helpers import tiny_model, write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "street.jpg"
    write_image(path, 96, 80, seed=1)
    return path


def _predict(model_dir, *args):
    return main(["predict", "--checkpoint", str(model_dir), "--short-side", "96",
                 "--max-size", "96", "--threshold", "0", "--top-k", "5", *args])


def test_box_prompts_in_the_same_image(model_dir, image, capsys):
    code = _predict(model_dir, "--image", str(image), "--box", "10,10,40,30:car",
                    "--box", "50,20,90,70:car", "--box", "5,40,30,78:person")
    assert code == 0, capsys.readouterr().err
    payload = json.loads((image.parent / "street_dinor1.json").read_text())
    assert len(payload["detections"]) == 5
    assert {d["label"] for d in payload["detections"]} <= {"car", "person"}
    for det in payload["detections"]:
        x0, y0, x1, y1 = det["box_xyxy"]
        assert 0 <= x0 <= x1 <= 96 and 0 <= y0 <= y1 <= 80 and 0 <= det["score"] <= 1
    with Image.open(image.parent / "street_dinor1.png") as drawn:
        assert drawn.size == (96, 80)
    assert "5 detections" in capsys.readouterr().out


def test_exemplar_image_and_text_prompts(model_dir, image, tmp_path):
    exemplar = tmp_path / "exemplar.png"
    write_image(exemplar, 120, 60, seed=2, fmt="PNG")
    out = tmp_path / "a.png"
    assert _predict(model_dir, "--image", str(image), "--exemplar", str(exemplar),
                    "--box", "100,5,119,59", "--out", str(out), "--json",
                    str(tmp_path / "a.json")) == 0
    payload = json.loads((tmp_path / "a.json").read_text())
    assert payload["prompts"]["exemplar"] == str(exemplar) and out.is_file()
    assert {d["label"] for d in payload["detections"]} == {"object"}
    assert _predict(model_dir, "--image", str(image), "--text", "car . traffic light .",
                    "--json", str(tmp_path / "t.json"), "--out", str(tmp_path / "t.png")) == 0
    labels = {d["label"] for d in json.loads((tmp_path / "t.json").read_text())["detections"]}
    assert labels <= {"car", "traffic light"} and labels


def _det(category: int, score: float, box: list[float]) -> dict:
    return {"image_id": 0, "category_id": category, "score": score, "bbox": box}


def test_best_per_prompt_keeps_the_best_distinct_boxes_of_each_prompt():
    detections = [
        _det(1, 0.40, [10, 10, 20, 20]),
        _det(1, 0.38, [11, 11, 20, 20]),  # IoU 0.82 with the best: its duplicate
        _det(1, 0.36, [12, 12, 8, 8]),  # wholly inside the best: a part of it
        _det(1, 0.30, [60, 60, 20, 20]),  # another object of the same prompt
        _det(1, 0.25, [90, 10, 20, 20]),
        _det(1, 0.19, [10, 60, 20, 20]),  # under half the prompt's best (0.40)
        _det(2, 0.05, [10, 10, 20, 20]),  # another prompt: judged against its own best
        _det(2, 0.04, [60, 10, 20, 20]),
    ]
    kept = best_per_prompt(detections, per_prompt=5)
    assert [(d["category_id"], d["score"]) for d in kept] == [
        (1, 0.40), (1, 0.30), (1, 0.25), (2, 0.05), (2, 0.04)]
    assert [d["score"] for d in best_per_prompt(detections, per_prompt=2)] == [
        0.40, 0.30, 0.05, 0.04]
    assert duplicate([11, 11, 20, 20], [10, 10, 20, 20])
    assert duplicate([12, 12, 8, 8], [10, 10, 20, 20])
    assert not duplicate([25, 10, 20, 20], [10, 10, 20, 20])  # IoU 0.14, a quarter inside


def test_default_keeps_a_few_distinct_boxes_per_prompt(model_dir, image, tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["predict", "--checkpoint", str(model_dir), "--short-side", "96",
                 "--max-size", "96", "--image", str(image), "--box", "10,10,40,30:car",
                 "--box", "5,40,30,78:person", "--json", str(out),
                 "--out", str(tmp_path / "d.png")]) == 0
    payload = json.loads(out.read_text())
    assert payload["threshold"] is None and payload["per_prompt"] == PER_PROMPT
    by_label = {}
    for det in payload["detections"]:
        by_label.setdefault(det["label"], []).append(det)
    assert set(by_label) == {"car", "person"}  # something shown for every prompt
    for dets in by_label.values():
        assert 1 <= len(dets) <= PER_PROMPT
        best = max(d["score"] for d in dets)
        assert all(d["score"] >= best / 2 for d in dets)
        boxes = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in (d["box_xyxy"] for d in dets)]
        assert not any(duplicate(a, b) for i, a in enumerate(boxes) for b in boxes[:i])
    assert f"({f'best {PER_PROMPT} per prompt'})" in capsys.readouterr().out
    # --threshold keeps every candidate above it instead
    assert _predict(model_dir, "--image", str(image), "--box", "10,10,40,30:car",
                    "--json", str(out), "--out", str(tmp_path / "d.png")) == 0
    payload = json.loads(out.read_text())
    assert payload["threshold"] == 0 and payload["per_prompt"] is None
    assert len(payload["detections"]) == 5  # --top-k 5, all above 0


def test_resolution_defaults_to_the_training_runs(model_dir, image, tmp_path):
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    for path in model_dir.iterdir():
        (run / "final_model" / path.name).write_bytes(path.read_bytes())
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(
        {"data": {"eval_short_side": 64, "eval_max_size": 72}}))
    out = tmp_path / "r.json"
    assert main(["predict", "--checkpoint", str(run), "--image", str(image), "--box",
                 "10,10,40,30", "--json", str(out), "--out", str(tmp_path / "r.png")]) == 0
    assert json.loads(out.read_text())["resolution"] == {"short_side": 64, "max_size": 72}
    assert main(["predict", "--checkpoint", str(run), "--image", str(image), "--box",
                 "10,10,40,30", "--short-side", "48", "--max-size", "56", "--json", str(out),
                 "--out", str(tmp_path / "r.png")]) == 0
    assert json.loads(out.read_text())["resolution"] == {"short_side": 48, "max_size": 56}


@pytest.mark.parametrize("args, message", [
    (["--image", "{missing}", "--box", "1,1,5,5"], "not found"),
    (["--image", "{garbage}", "--box", "1,1,5,5"], "not a readable image"),
    (["--image", "{image}", "--box", "10,10,200,30"], "lies outside"),
    (["--image", "{image}", "--box", "10,10,5,30"], "x1 > x0"),
    (["--image", "{image}", "--box", "10,10,30"], "expected x0,y0,x1,y1"),
    (["--image", "{image}"], "give prompt boxes (--box) or --text"),
    (["--image", "{image}", "--text", " . . "], "no class names"),
    (["--image", "{image}", "--box", "1,1,5,5", "--per-prompt", "2"], "not both"),
])
def test_bad_inputs_get_one_line_errors(model_dir, image, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00not an image")
    paths = {"missing": tmp_path / "nope.jpg", "garbage": garbage, "image": image}
    code = _predict(model_dir, *[a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
