"""The Python API (`from dinor1 import Detector`): every prompt mode, many requests at once
giving what each gives alone, the same detections as `dinor1 predict`, and one-line errors."""

import json

import numpy as np
import pytest
import torch

from dinor1.errors import UserError
from dinor1.model.prompts import GenericPrompts
from tests.helpers import tiny_model, write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def detector(model_dir):
    from dinor1 import Detector

    return Detector.from_pretrained(str(model_dir), short_side=96, max_size=96)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (width, height) in enumerate([(96, 80), (120, 60), (64, 96)]):
        paths.append(folder / f"im{i}.jpg")
        write_image(paths[-1], width, height, seed=i + 1)
    return paths


@pytest.fixture(scope="module")
def generic(detector, tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "generic.safetensors"
    torch.manual_seed(1)
    width = detector.model.config.d_model
    GenericPrompts(torch.randn(3, width), [7, 11, 13], ["car", "tree", "dog"], [2, 2, 2]).save(path)
    return path


def _requests(detector, images, generic):
    return [
        detector.request(images[0], boxes=[(10, 10, 40, 30, "car"), "50,20,90,70:car",
                                           {"box": [5, 40, 30, 78], "label": "person"}],
                         threshold=0.0, top_k=8),
        detector.request(images[1], text="car . person . tree", threshold=0.0, top_k=8),
        detector.request(images[2], boxes=[(100, 5, 119, 59)], exemplar=images[1],
                         threshold=0.0, top_k=8),
        detector.request(images[1], prompts=str(generic), threshold=0.0, top_k=8),
        detector.request(images[2], boxes=[(3, 3, 60, 90, "x")], threshold=0.0, top_k=8),
    ]


def test_every_prompt_mode_and_the_detection_format(detector, images, generic):
    requests = _requests(detector, images, generic)
    found = detector.detect_many(requests)
    labels = [{"car", "person"}, {"car", "person", "tree"}, {"object"}, {"car", "tree", "dog"},
              {"x"}]
    for request, detections, allowed in zip(requests, found, labels):
        assert len(detections) == 8
        height, width = request.image.shape[:2]
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True)
        for d in detections:
            assert d["label"] in allowed and 0 <= d["score"] <= 1
            x, y, w, h = d["bbox"]
            assert d["box_xyxy"] == pytest.approx([x, y, x + w, y + h], abs=0.011)
            assert 0 <= x <= x + w <= width + 0.01 and 0 <= y <= y + h <= height + 0.01
    # generic prompts keep their dataset's category ids; the others number their prompts
    assert {d["category_id"] for d in found[3]} <= {7, 11, 13}
    assert {d["category_id"] for d in found[0]} <= {0, 1}


def test_many_requests_at_once_give_what_each_gives_alone(detector, images, generic):
    # two of each image size among them: those share their passes
    requests = _requests(detector, images, generic)
    requests += [detector.request(images[0], text="car . person . tree", threshold=0.0, top_k=8),
                 detector.request(images[1], boxes=[(5, 5, 60, 50, "y")], threshold=0.0)]
    together = detector.detect_many(requests)
    for request, batched in zip(requests, together):
        assert batched == detector.detect_many([request])[0]


def test_the_same_detections_as_dinor1_predict(detector, model_dir, images, tmp_path):
    from dinor1.cli import main

    out = tmp_path / "p.json"
    assert main(["predict", "--checkpoint", str(model_dir), "--image", str(images[0]),
                 "--short-side", "96", "--max-size", "96", "--box", "10,10,40,30:car",
                 "--box", "5,40,30,78:person", "--json", str(out), "--out",
                 str(tmp_path / "p.png")]) == 0
    predicted = json.loads(out.read_text())["detections"]
    found = detector(str(images[0]), boxes=["10,10,40,30:car", "5,40,30,78:person"])
    assert [(d["label"], d["score"], d["box_xyxy"]) for d in found] == \
        [(d["label"], d["score"], d["box_xyxy"]) for d in predicted]
    assert found  # (per prompt, the best boxes: at least one)


def test_images_as_arrays_bytes_and_pil(detector, images):
    from PIL import Image

    path = images[0]
    expected = detector(str(path), text="car", threshold=0.0, top_k=3)
    with Image.open(path) as img:
        as_pil = detector(img, text="car", threshold=0.0, top_k=3)
        as_array = detector(np.asarray(img.convert("RGB")), text="car", threshold=0.0, top_k=3)
    as_bytes = detector(path.read_bytes(), text=["car"], threshold=0.0, top_k=3)
    for other in (as_pil, as_array, as_bytes):
        assert other == expected


@pytest.mark.parametrize("kwargs,message", [
    ({}, "give one prompt mode"),
    ({"text": "car", "boxes": [(1, 1, 5, 5)]}, "got boxes and text"),
    ({"text": " . "}, "text has no class names"),
    ({"boxes": [(1, 2, 3)]}, "box 1 (1, 2, 3): expected x0,y0,x1,y1[:label] in pixels"),
    ({"boxes": ["1,1,5,5", "5,5,1,9"]}, "box 2 [5.0, 5.0, 1.0, 9.0]: needs x1 > x0"),
    ({"boxes": [(1, 1, 500, 5)]}, "lies outside the image (96x80)"),
    ({"boxes": [(1, 1, 5, 5)], "exemplar": b"not an image"}, "exemplar is not a readable image"),
    ({"exemplar": "x.png"}, "give one prompt mode"),
    ({"prompts": "missing.safetensors"}, "prompts: missing.safetensors not found"),
    ({"text": "car", "per_prompt": 0}, "per_prompt 0"),
    ({"text": "car", "threshold": 2.0}, "threshold 2.0"),
])
def test_bad_requests_are_one_line_errors(detector, images, kwargs, message):
    with pytest.raises(UserError, match=None) as error:
        detector.request(images[0], **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_images_are_one_line_errors(detector, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    for image, message in [(broken, f"image {broken} is not a readable image"),
                           (tmp_path / "none.jpg", "none.jpg not found"),
                           (b"", "image is not a readable image"),
                           (np.zeros((4, 4), np.float32), "expected a uint8 array")]:
        with pytest.raises(UserError) as error:
            detector.request(image, text="car")
        assert message in str(error.value), error.value
    with pytest.raises(UserError, match="is too large"):
        detector.request(np.zeros((100, 100, 3), np.uint8), text="car", max_pixels=5000)


def test_the_readme_snippet_runs(model_dir, images, generic, tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", 10)]
    for name, path in [("runs/demo", model_dir), ("photo.jpg", images[0]),
                       ("cat.jpg", images[1]), ("generic_prompts.safetensors", generic)]:
        assert f'"{name}"' in code, name
        code = code.replace(f'"{name}"', repr(str(path)))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
