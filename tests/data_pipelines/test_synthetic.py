"""The synthetic dataset: valid COCO, open-set splits, deterministic, not trivial."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from data_pipelines.synthetic import SyntheticConfig, category_table, generate_synthetic_coco

SMALL = SyntheticConfig(image_size=96, num_train=30, num_val=20, num_support=16,
                        num_categories=8, num_novel=2, seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate_synthetic_coco(out, SMALL)


def test_valid_coco_with_boxes_inside_images(dataset):
    out, paths = dataset
    for split, path in paths.items():
        coco = COCO(str(path))
        assert coco.getImgIds() and coco.getAnnIds()
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(out / "images" / split / image["file_name"]) as img:
                assert img.size == (image["width"], image["height"]) == (96, 96)
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            assert 0 < ann["area"] <= w * h


def test_open_set_splits(dataset):
    _, paths = dataset
    load = {s: json.loads(p.read_text()) for s, p in paths.items()}
    novel = {c["id"] for c in load["train"]["categories"] if c["novel"]}
    assert novel == {7, 8}
    used = {s: {a["category_id"] for a in d["annotations"]} for s, d in load.items()}
    assert not used["train"] & novel
    assert used["val"] & novel
    assert used["support"] == set(range(1, 9))


def test_deterministic_for_any_worker_count(tmp_path, dataset):
    out, paths = dataset
    again = generate_synthetic_coco(tmp_path / "b", SMALL, num_workers=2)
    for split in paths:
        assert paths[split].read_text() == again[split].read_text()
    first = sorted((out / "images" / "train").iterdir())[:5]
    for f in first:
        assert f.read_bytes() == (tmp_path / "b" / "images" / "train" / f.name).read_bytes()
    other = generate_synthetic_coco(tmp_path / "c", SyntheticConfig(**{
        **SMALL.__dict__, "seed": 2, "num_val": 1, "num_support": 1}))
    assert other["train"].read_text() != paths["train"].read_text()


def test_scenes_are_not_trivial(dataset):
    _, paths = dataset
    data = json.loads(paths["val"].read_text())
    per_image: dict[int, list] = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    counts = [len(v) for v in per_image.values()]
    assert min(counts) < max(counts)
    assert any(len({a["category_id"] for a in v}) > 1 for v in per_image.values())

    def overlaps(a, b):
        ax, ay, aw, ah = a["bbox"]
        bx, by, bw, bh = b["bbox"]
        return min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)

    assert any(overlaps(a, b) for v in per_image.values() for i, a in enumerate(v)
               for b in v[i + 1:])


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_novel"):
        SyntheticConfig(num_categories=4, num_novel=4)
    with pytest.raises(ValueError, match="image_format"):
        SyntheticConfig(image_format="gif")
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticConfig(min_objects=5, max_objects=2)


def test_category_table_has_unique_pairs():
    names = [c["name"] for c in category_table(96)]
    assert len(set(names)) == 96
    first = category_table(8)
    assert len({c["shape"] for c in first}) == 8 and len({c["colour"] for c in first}) == 8


def test_objects_stay_visible(dataset):
    """Occluded objects keep >= 30% of their pixels: area is never a sliver of the box."""
    _, paths = dataset
    data = json.loads(paths["train"].read_text())
    ratios = np.array([a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in data["annotations"]])
    assert ratios.min() > 0.05
