"""Converters -> shards: round trip, documented bad-input counts, restartability."""

import json
import math
import os
from pathlib import Path

import pytest
from pycocotools.coco import COCO

import dinor1.data_pipelines.shard_writer as shard_writer
from dinor1.data_pipelines.converters import find_odinw_datasets, load_coco, load_lvis, load_odvg
from dinor1.data_pipelines.converters.odinw import load_odinw_split
from dinor1.data_pipelines.shard_format import sha256_file
from dinor1.data_pipelines.shard_writer import write_shards
from tests.helpers import make_coco, read_shard_samples, write_image


def _bad_coco(root: Path):
    """A COCO dataset with one instance of every documented bad input."""
    ann_path, images, data = make_coco(root, num_images=10)
    good = {i: [a for a in data["annotations"] if a["image_id"] == i] for i in range(1, 11)}
    # image-level problems
    data["images"] += [
        {"id": 11, "file_name": "missing.jpg", "width": 64, "height": 48},
        {"id": 12, "file_name": "garbage.jpg", "width": 64, "height": 48},
        {"id": 13, "file_name": "truncated.jpg", "width": 64, "height": 48},
        {"id": 3, "file_name": "0003.jpg", "width": 64, "height": 48},  # duplicate id
    ]
    (images / "garbage.jpg").write_bytes(b"this is not an image")
    full = write_image(images / "tmp.jpg", 64, 48, seed=99)
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    data["images"][4]["width"] = 100  # image 5: size in JSON differs from the real one
    bad = [
        {"image_id": 999, "bbox": [1, 1, 5, 5], "category_id": 1},  # orphan
        {"image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 77},  # unknown category
        {"image_id": 1, "bbox": [1, 1, 0, 5], "category_id": 1},  # zero width
        {"image_id": 1, "bbox": [1, float("nan"), 5, 5], "category_id": 1},  # NaN
        {"image_id": 1, "bbox": [1, 2, 3], "category_id": 1},  # not 4 numbers
        {"image_id": 2, "bbox": [-4, 40, 10, 20], "category_id": 2},  # partly outside
        {"image_id": 2, "bbox": [70, 50, 5, 5], "category_id": 2},  # entirely outside
    ]
    for i, ann in enumerate(bad):
        ann.update(id=1000 + i, iscrowd=0, area=25.0)
    data["annotations"] += bad
    ann_path.write_text(json.dumps(data))  # Python's json writes and reads NaN
    expected = {i: [dict(a) for a in anns] for i, anns in good.items()}
    expected[2].append({"id": 1005, "bbox": [0.0, 40.0, 6.0, 8.0], "category_id": 2,
                        "iscrowd": 0, "area": 48.0})
    return ann_path, images, expected


EXPECTED_COUNTS = {
    "missing_image": 1, "unreadable_image": 2, "duplicate_image_id": 1, "orphan_annotation": 1,
    "unknown_category": 1, "invalid_box": 3, "clipped_box": 1, "box_outside_image": 1,
    "size_mismatch": 1,
}


def test_coco_round_trip_and_bad_input_counts(tmp_path):
    ann_path, images, expected = _bad_coco(tmp_path / "src")
    manifest = write_shards(load_coco(ann_path, images, split="train"), tmp_path / "shards",
                            samples_per_shard=4, num_workers=2, progress=False)
    assert manifest["complete"] and manifest["num_samples"] == 10
    assert manifest["skipped"] == EXPECTED_COUNTS
    assert manifest["categories"] == {"1": "cat", "2": "dog", "5": "bird"}
    # 13 distinct ids in key order, 4 per shard: ids 11-13 are the missing/unreadable ones
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2, 0]
    for entry in manifest["shards"]:
        assert sha256_file(tmp_path / "shards" / entry["name"]) == entry["sha256"]
    samples = read_shard_samples(tmp_path / "shards")
    assert sorted(samples) == list(range(1, 11))
    for image_id, sample in samples.items():
        assert (sample["width"], sample["height"]) == (64, 48)  # decoded size wins
        got = sorted(sample["annotations"], key=lambda a: a["id"])
        want = sorted(expected[image_id], key=lambda a: a["id"])
        for a in want:
            a.pop("image_id", None)
        assert got == want, image_id


def test_original_bytes_and_deterministic_shards(tmp_path):
    ann_path, images, _ = make_coco(tmp_path / "src", num_images=5)
    m1 = write_shards(load_coco(ann_path, images), tmp_path / "a", samples_per_shard=2,
                      progress=False)
    m2 = write_shards(load_coco(ann_path, images), tmp_path / "b", samples_per_shard=2,
                      num_workers=2, progress=False)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    import tarfile

    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000001.jpg", "000000000001.json"]
        assert tar.extractfile(names[0]).read() == (images / "0001.jpg").read_bytes()


def test_restart_skips_complete_shards_and_repairs_the_rest(tmp_path, monkeypatch):
    ann_path, images, _ = make_coco(tmp_path / "src", num_images=9)
    out = tmp_path / "shards"
    calls = []
    real = shard_writer.write_one_shard

    def interrupted(records, category_ids, path):
        if calls:
            raise KeyboardInterrupt  # the run dies while writing the second shard
        calls.append(path)
        return real(records, category_ids, path)

    monkeypatch.setattr(shard_writer, "write_one_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(load_coco(ann_path, images), out, samples_per_shard=3, progress=False)
    partial = json.loads((out / "manifest.json").read_text())
    assert partial["complete"] is False and [s["name"] for s in partial["shards"]] == [
        "shard-000000.tar"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    monkeypatch.setattr(shard_writer, "write_one_shard", real)

    (out / ".shard-000001.tar.tmp-4242").write_bytes(b"half a shard")
    first_mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    manifest = write_shards(load_coco(ann_path, images), out, samples_per_shard=3,
                            progress=False)
    assert manifest["complete"] and manifest["num_samples"] == 9
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first_mtime  # reused
    assert not list(out.glob(".shard-*"))

    # a damaged and a deleted shard are rewritten; the intact one is not
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    with open(out / "shard-000001.tar", "ab") as f:
        f.write(b"x")
    os.remove(out / "shard-000002.tar")
    again = write_shards(load_coco(ann_path, images), out, samples_per_shard=3, progress=False)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtimes["shard-000000.tar"]
    assert (out / "shard-000001.tar").stat().st_mtime_ns != mtimes["shard-000001.tar"]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_synthetic_like_coco_loads_in_pycocotools_after_round_trip(tmp_path):
    """Shards -> COCO dict again -> pycocotools accepts it (the eval side relies on this)."""
    ann_path, images, data = make_coco(tmp_path / "src", num_images=6)
    write_shards(load_coco(ann_path, images), tmp_path / "s", progress=False)
    samples = read_shard_samples(tmp_path / "s")
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": s["width"], "height": s["height"]} for i, s in
                   samples.items()],
        "annotations": [dict(a, image_id=i) for i, s in samples.items() for a in
                        s["annotations"]],
        "categories": data["categories"],
    }
    coco.createIndex()
    assert len(coco.getAnnIds()) == len(data["annotations"])


def test_lvis_keeps_evaluation_fields(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "val2017" / "000000000007.jpg", 40, 30, seed=1)
    write_image(root / "val2017" / "000000000008.jpg", 40, 30, seed=2)
    lvis = {
        "images": [
            {"id": 7, "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg",
             "width": 40, "height": 30, "neg_category_ids": [3], "not_exhaustive_category_ids": [1]},
            {"id": 8, "coco_url": "http://images.cocodataset.org/val2017/000000000008.jpg",
             "width": 40, "height": 30},
        ],
        "annotations": [{"id": 1, "image_id": 7, "bbox": [1, 2, 10, 10], "category_id": 1,
                         "area": 100}],
        "categories": [{"id": 1, "name": "apple", "frequency": "r", "synonyms": ["apple"]},
                       {"id": 3, "name": "zebra", "frequency": "f", "synonyms": []}],
    }
    ann = tmp_path / "lvis_v1_val.json"
    ann.write_text(json.dumps(lvis))
    manifest = write_shards(load_lvis(ann, root), tmp_path / "s", progress=False)
    assert manifest["dataset"] == "lvis" and manifest["split"] == "val"
    assert manifest["category_attributes"]["1"]["frequency"] == "r"
    samples = read_shard_samples(tmp_path / "s")
    assert samples[7]["neg_category_ids"] == [3]
    assert samples[7]["not_exhaustive_category_ids"] == [1]
    assert samples[8]["neg_category_ids"] == [] and samples[7]["file_name"].startswith("val2017/")


def test_odinw_one_shard_set_per_dataset_and_split(tmp_path):
    root = tmp_path / "odinw"
    for rel in ["Aquarium/raw/train", "Aquarium/raw/valid", "pothole/test"]:
        make_coco(root / rel, num_images=2)
        (root / rel / "instances.json").rename(root / rel / "_annotations.coco.json")
        for img in (root / rel / "images").iterdir():
            img.rename(root / rel / img.name)
    found = find_odinw_datasets(root)
    assert [r for r, _, _ in found] == ["Aquarium/raw/train", "Aquarium/raw/valid",
                                        "pothole/test"]
    for rel, ann, imgs in found:
        source = load_odinw_split(root, rel, ann, imgs)
        manifest = write_shards(source, tmp_path / "out" / rel, progress=False)
        assert manifest["num_samples"] == 2
    assert source.dataset == "odinw/pothole" and source.split == "test"


def test_odvg_detection_and_grounding(tmp_path):
    write_image(tmp_path / "img" / "a.jpg", 50, 40, seed=3)
    write_image(tmp_path / "img" / "b.jpg", 50, 40, seed=4)
    det = tmp_path / "det.jsonl"
    det.write_text("\n".join([
        json.dumps({"filename": "a.jpg", "height": 40, "width": 50, "detection": {"instances": [
            {"bbox": [1, 2, 11, 22], "label": 0, "category": "person"},
            {"bbox": [5, 5, 9, 9], "label": 4, "category": "kite"}]}}),
        "{not json",
    ]))
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({"0": "person", "4": "kite"}))
    manifest = write_shards(load_odvg(det, tmp_path / "img", label_map=label_map),
                            tmp_path / "s1", progress=False)
    assert manifest["categories"] == {"0": "person", "4": "kite"}
    assert manifest["skipped"]["invalid_line"] == 1
    sample = read_shard_samples(tmp_path / "s1")[1]
    assert [a["bbox"] for a in sample["annotations"]] == [[1, 2, 10, 20], [5, 5, 4, 4]]

    grd = tmp_path / "grounding.jsonl"
    grd.write_text(json.dumps({"filename": "b.jpg", "height": 40, "width": 50, "grounding": {
        "caption": "A dog and a cat", "regions": [
            {"bbox": [0, 0, 10, 10], "phrase": "A dog", "tokens_positive": [[0, 5]]},
            {"bbox": [20, 20, 30, 30], "phrase": "a cat", "tokens_positive": [[10, 15]]}]}}))
    manifest = write_shards(load_odvg(grd, tmp_path / "img"), tmp_path / "s2", progress=False)
    assert manifest["categories"] == {"1": "a dog", "2": "a cat"}
    sample = read_shard_samples(tmp_path / "s2")[1]
    assert sample["caption"] == "A dog and a cat"
    assert [a["phrase"] for a in sample["annotations"]] == ["a dog", "a cat"]
    assert all(math.isclose(v, 10) for v in sample["annotations"][1]["bbox"][2:])
