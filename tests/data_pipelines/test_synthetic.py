"""The synthetic dataset: valid COCO, open-set splits, deterministic, cached, not trivial."""

import dataclasses
import json

import pytest
from PIL import Image
from pycocotools.coco import COCO

from dinor1.data_pipelines.synthetic import (
    MIN_PIXELS,
    SyntheticConfig,
    category_table,
    generate_synthetic_coco,
    near_miss_pairs,
    render_scene,
)

SMALL = SyntheticConfig(seed=1, image_size=96, num_train=30, num_val=24, num_support=16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate_synthetic_coco(out, SMALL)


def _load(paths):
    return {split: json.loads(path.read_text()) for split, path in paths.items()}


def test_layout_and_valid_coco(dataset):
    out, paths = dataset
    assert set(paths) == {"train", "val", "support"}
    counts = {"train": 30, "val": 24, "support": 16}
    for split, path in paths.items():
        assert path == out / "annotations" / f"instances_{split}.json"
        coco = COCO(str(path))
        assert sorted(coco.getImgIds()) == list(range(1, counts[split] + 1))
        assert len(set(coco.getAnnIds())) == len(coco.dataset["annotations"]) > 0
        assert "dinor1 synthetic" in coco.dataset["info"]["description"]
        assert coco.dataset["info"]["config"] == dataclasses.asdict(SMALL)
        for image in coco.loadImgs(coco.getImgIds()):
            assert image["file_name"] == f"{image['id']:012d}.png"
            with Image.open(out / "images" / split / image["file_name"]) as img:
                assert img.size == (image["width"], image["height"]) == (96, 96)
                assert img.mode == "RGB"
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) for v in ann["bbox"])
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            assert isinstance(ann["area"], float) and MIN_PIXELS <= ann["area"] <= w * h
            assert ann["iscrowd"] == 0
        assert [c["id"] for c in coco.dataset["categories"]] == list(range(1, 9))


def test_open_set_splits(dataset):
    _, paths = dataset
    data = _load(paths)
    novel = {c["id"] for c in data["train"]["categories"] if c["novel"]}
    assert novel == {7, 8}  # the last num_novel categories
    used = {split: {a["category_id"] for a in d["annotations"]} for split, d in data.items()}
    assert used["train"] and not used["train"] & novel
    assert used["val"] & novel
    assert used["support"] == set(range(1, 9))
    # support image i holds category i % num_categories, so it can serve "N shots per class"
    for image in data["support"]["images"]:
        cats = {a["category_id"] for a in data["support"]["annotations"]
                if a["image_id"] == image["id"]}
        assert (image["id"] - 1) % 8 + 1 in cats


def test_deterministic_for_any_worker_count(tmp_path, dataset):
    out, paths = dataset
    again = generate_synthetic_coco(tmp_path / "b", SMALL, num_workers=2)
    for split in paths:
        assert paths[split].read_text() == again[split].read_text()
        for image in sorted((out / "images" / split).iterdir()):
            other = tmp_path / "b" / "images" / split / image.name
            assert image.read_bytes() == other.read_bytes()
    reseeded = dataclasses.replace(SMALL, seed=2, num_train=4, num_val=0, num_support=0)
    generate_synthetic_coco(tmp_path / "c", reseeded)
    for name in ("000000000001.png", "000000000002.png"):
        assert ((out / "images" / "train" / name).read_bytes()
                != (tmp_path / "c" / "images" / "train" / name).read_bytes())


def test_same_config_is_reused_and_a_new_one_regenerates(tmp_path):
    config = dataclasses.replace(SMALL, num_train=6, num_val=2, num_support=2)
    paths = generate_synthetic_coco(tmp_path, config)
    stamp = {split: path.stat().st_mtime_ns for split, path in paths.items()}
    assert generate_synthetic_coco(tmp_path, config) == paths
    assert {split: path.stat().st_mtime_ns for split, path in paths.items()} == stamp

    smaller = dataclasses.replace(config, num_train=3, image_format="jpg")
    paths = generate_synthetic_coco(tmp_path, smaller)
    train = json.loads(paths["train"].read_text())
    assert [im["file_name"] for im in train["images"]] == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    # the stale png images of the first run are gone: the folder matches the JSON again
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == [
        im["file_name"] for im in train["images"]]
    with Image.open(tmp_path / "images" / "train" / "000000000001.jpg") as img:
        assert img.format == "JPEG" and img.size == (96, 96)


def test_scenes_are_not_trivial(dataset):
    _, paths = dataset
    anns = [a for d in _load(paths).values() for a in d["annotations"]]
    per_image: dict[tuple, list] = {}
    for split, d in _load(paths).items():
        for a in d["annotations"]:
            per_image.setdefault((split, a["image_id"]), []).append(a)
    counts = [len(v) for v in per_image.values()]
    assert min(counts) < max(counts)
    assert any(len({a["category_id"] for a in v}) > 1 for v in per_image.values())

    def iou(a, b):
        ax, ay, aw, ah = a["bbox"]
        bx, by, bw, bh = b["bbox"]
        inter = (max(0, min(ax + aw, bx + bw) - max(ax, bx))
                 * max(0, min(ay + ah, by + bh) - max(ay, by)))
        return inter / (aw * ah + bw * bh - inter)

    assert any(iou(a, b) > 0 for v in per_image.values() for i, a in enumerate(v)
               for b in v[i + 1:])
    sides = [max(a["bbox"][2:]) for a in anns]
    assert min(sides) < 0.2 * 96 < 0.3 * 96 < max(sides)  # small and large objects
    # occluded objects keep a solid visible part, never a sliver of their box
    assert min(a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in anns) > 0.05


@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("image_size", 16), ("num_train", -1), ("num_val", 1.5),
    ("num_categories", 0), ("num_categories", 97), ("num_novel", 8), ("min_objects", 0),
    ("max_objects", 0), ("min_scale", 0.0), ("max_scale", 0.05), ("max_scale", 1.5),
    ("max_overlap_iou", -0.1), ("num_distractors", -1), ("image_format", "gif"),
    ("num_test", -1), ("long_tail", -1.0), ("long_tail", 6.0), ("rare_fraction", 0.0),
    ("num_hard_distractors", -1),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field}="):
        SyntheticConfig(**{field: value})


def test_category_table():
    table = category_table(96)
    assert [c["id"] for c in table] == list(range(1, 97))
    assert len({(c["shape"], c["colour"]) for c in table}) == 96
    assert all(c["name"] == f"{c['colour']} {c['shape']}" for c in table)
    first = category_table(8)
    assert first == table[:8] and first[0]["name"] == "red circle"
    assert len({c["shape"] for c in first}) == len({c["colour"] for c in first}) == 8
    assert len(category_table(48)) == 48
    with pytest.raises(ValueError):
        category_table(97)


def test_many_categories_and_crowded_scenes(tmp_path):
    config = SyntheticConfig(image_size=64, num_train=4, num_val=4, num_support=48,
                             num_categories=48, num_novel=10, min_objects=8, max_objects=12,
                             min_scale=0.1, max_scale=0.5, max_overlap_iou=0.0)
    data = _load(generate_synthetic_coco(tmp_path, config))
    assert {a["category_id"] for a in data["support"]["annotations"]} == set(range(1, 49))
    assert max(a["category_id"] for a in data["train"]["annotations"]) <= 38


def test_long_tail_test_split_and_near_miss_distractors(tmp_path):
    """The benchmark settings: a long-tailed train split whose categories are labelled r/c/f by
    their train image counts (LVIS's rule, scaled), a test split like val, and unlabelled
    near-miss objects that never cover an annotated one. The demo's data is unchanged by them."""
    config = SyntheticConfig(image_size=64, num_train=300, num_val=30, num_support=16,
                             num_test=30, num_categories=10, num_novel=2, long_tail=2.5,
                             rare_fraction=0.02, num_hard_distractors=2)
    data = _load(generate_synthetic_coco(tmp_path, config, num_workers=2))
    assert set(data) == {"train", "val", "support", "test"}
    images: dict[int, set] = {}
    for a in data["train"]["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
    counts = [len(images.get(k, ())) for k in range(1, 9)]
    assert counts[0] > 5 * counts[-1]  # (a long tail: the first class far ahead of the last)
    for split in data.values():  # every split carries the same labels
        assert split["categories"] == data["train"]["categories"]
    for c in data["train"]["categories"]:
        n = len(images.get(c["id"], ()))
        if c["novel"]:
            assert "frequency" not in c and n == 0
        else:
            assert c["frequency"] == ("r" if n <= 6 else "c" if n <= 60 else "f")
    assert {c.get("frequency") for c in data["train"]["categories"]} == {"r", "c", "f", None}
    # val and test: all classes, drawn independently
    assert data["test"]["images"] and data["test"]["annotations"] != data["val"]["annotations"]
    assert {9, 10} <= {a["category_id"] for a in data["test"]["annotations"]}
    # near-miss pairs: neither a category's pair, nor made of an unused shape or colour
    pairs = near_miss_pairs(category_table(10))
    taken = {(c["shape"], c["colour"]) for c in category_table(10)}
    assert pairs and not set(pairs) & taken
    shapes = {c["shape"] for c in category_table(10)}
    colours = {c["colour"] for c in category_table(10)}
    assert all(shape in shapes and colour in colours for shape, colour in pairs)


def test_hard_distractors_leave_the_annotations_alone():
    base = SyntheticConfig(image_size=96, num_categories=8, max_objects=3)
    hard = dataclasses.replace(base, num_hard_distractors=3)
    changed = 0
    for index in range(12):
        image, annotations = render_scene(hard, "val", index)
        plain_image, plain_annotations = render_scene(base, "val", index)
        assert annotations == plain_annotations  # drawn after the objects, never over them
        changed += int((image != plain_image).any())
    assert changed >= 6  # most scenes got a near-miss object
