"""`dinor1 predict`: box prompts (same image or an exemplar), text prompts, and bad inputs."""

import json

import pytest
import torch
from PIL import Image

from dinor1.cli import main
from dinor1.model.dino_r1 import DinoR1
from tests.helpers import write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    DinoR1.from_pretrained("tiny-cpu").save_pretrained(path)
    return path


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


@pytest.mark.parametrize("args, message", [
    (["--image", "{missing}", "--box", "1,1,5,5"], "not found"),
    (["--image", "{garbage}", "--box", "1,1,5,5"], "not a readable image"),
    (["--image", "{image}", "--box", "10,10,200,30"], "lies outside"),
    (["--image", "{image}", "--box", "10,10,5,30"], "x1 > x0"),
    (["--image", "{image}", "--box", "10,10,30"], "expected x0,y0,x1,y1"),
    (["--image", "{image}"], "give prompt boxes (--box) or --text"),
    (["--image", "{image}", "--text", " . . "], "no class names"),
])
def test_bad_inputs_get_one_line_errors(model_dir, image, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00not an image")
    paths = {"missing": tmp_path / "nope.jpg", "garbage": garbage, "image": image}
    code = _predict(model_dir, *[a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
