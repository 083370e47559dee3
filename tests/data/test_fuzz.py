"""Fuzzed shards: every bad sample and box is skipped and counted by kind, nothing good is lost."""

import io
import json

import numpy as np
import pytest
import torch

from dinor1.config import DataConfig
from dinor1.data.collate import DetectionCollateFn
from dinor1.data.datasource import iter_shard_rows
from dinor1.data.pipeline import detection_dataset, iter_detection_batches
from dinor1.data.quality import SKIP_KINDS, QualityCounter, skip_kind
from dinor1.data.transforms import DecodeSample
from tests.fuzz_shards import build_fuzzed_shards, expected_metrics
from tests.helpers import write_image, write_tar

CFG = dict(batch_size=4, train_short_sides=[48, 64], train_max_size=96, eval_short_side=64,
           eval_max_size=96, local_shuffle_buffer=8, decode_batch_size=8)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    return build_fuzzed_shards(tmp_path_factory.mktemp("fuzz"))


def _samples(tmp_path, n: int) -> list[list[tuple[str, bytes]]]:
    img = write_image(tmp_path / "x.jpg", 32, 24, seed=0)
    meta = {"image_id": 0, "annotations": [{"bbox": [1, 1, 8, 8], "category_id": 1}]}
    return [[(f"k{i}.jpg", img), (f"k{i}.json", json.dumps({**meta, "image_id": i}).encode())]
            for i in range(n)]


def _rows(data: bytes) -> list[dict]:
    return list(iter_shard_rows(io.BytesIO(data), "s.tar"))


@pytest.mark.parametrize("where", ["mid-image", "mid-header", "between-samples", "mid-sample"])
def test_truncated_tar_keeps_every_complete_sample_before_the_break(tmp_path, where):
    samples = _samples(tmp_path, 4)
    write_tar(tmp_path / "s.tar", [m for s in samples for m in s])
    data = (tmp_path / "s.tar").read_bytes()
    two = sum(512 + -(-len(d) // 512) * 512 for s in samples[:2] for _, d in s)
    image = 512 + -(-len(samples[2][0][1]) // 512) * 512
    cut = {"mid-image": two + 600, "mid-header": two + 100, "between-samples": two,
           "mid-sample": two + image}[where]
    rows = _rows(data[:cut])
    assert [r["__key__"] for r in rows if not r["error"]] == ["k0", "k1"]
    kinds = [skip_kind(r["error"]) for r in rows if r["error"]]
    broken = ["truncated_sample"] if where in ("mid-image", "mid-sample") else []
    assert kinds == broken + ["corrupt_shard"]
    assert "s.tar" in rows[-1]["error"]


def test_whole_tars_count_nothing_and_unreadable_ones_once(tmp_path):
    samples = _samples(tmp_path, 2)
    write_tar(tmp_path / "s.tar", [m for s in samples for m in s])
    assert [r["error"] for r in _rows((tmp_path / "s.tar").read_bytes())] == ["", ""]
    write_tar(tmp_path / "empty.tar", [])
    assert _rows((tmp_path / "empty.tar").read_bytes()) == []
    for data in (b"", b"\x00" * 100, b"garbage " * 200):
        rows = _rows(data)
        assert len(rows) == 1 and skip_kind(rows[0]["error"]) == "corrupt_shard"


def test_random_damage_never_raises(tmp_path):
    """Seeded byte flips, cuts and splices of a good shard: reading, decoding and collating
    never raise, and every skipped row carries a known kind."""
    samples = _samples(tmp_path, 3)
    write_tar(tmp_path / "s.tar", [m for s in samples for m in s])
    good = (tmp_path / "s.tar").read_bytes()
    rng = np.random.default_rng(0)
    decode, collate = DecodeSample(32, 64, category_ids=[1]), DetectionCollateFn(train=False)
    for _ in range(150):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(0, len(data)))
            data[at:at + int(rng.integers(1, 16))] = rng.bytes(int(rng.integers(1, 16)))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(0, len(data)))]
        rows = _rows(bytes(data))
        if not rows:
            continue
        decoded = decode({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
        batch = collate(decoded)
        errors = [str(e) for e in decoded["error"] if e]
        assert all(skip_kind(e) != "other" for e in errors), errors
        assert int(batch["num_skipped"]) == len(errors) == int(batch["skipped_by_kind"].sum())
        assert len(batch["image_ids"]) + len(errors) == len(rows)


def _read_all(ds, cfg, *, train: bool) -> tuple[list[int], int, QualityCounter]:
    ids, boxes, quality = [], 0, QualityCounter(max_errors=None)
    for batch in iter_detection_batches(ds, cfg, train=train, device="cpu"):
        ids += batch["image_ids"].tolist()
        boxes += len(batch["boxes"])
        assert torch.isfinite(batch["boxes"]).all()
        assert int(batch["num_skipped"]) == int(batch["skipped_by_kind"].sum())
        assert int(batch["dropped_boxes"]) == int(batch["dropped_by_rule"].sum())
        quality.update(batch)
    return ids, boxes, quality


@pytest.mark.ray
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fuzzed_shards_yield_the_good_samples_and_exact_counts(ray_cluster, fuzzed, train):
    shards, expected = fuzzed
    cfg = DataConfig(**CFG)
    ids, boxes, quality = _read_all(detection_dataset(str(shards), cfg, train=train), cfg,
                                    train=train)
    assert sorted(ids) == expected["good_image_ids"]  # each once, none lost, none bad
    assert len(ids) + quality.skipped_samples == expected["num_rows"]
    assert boxes == expected["kept_boxes"]
    assert quality.metrics("data/") == expected_metrics(expected, "data/")
    named = {kind: [e for e in quality.errors if skip_kind(e) == kind] for kind in SKIP_KINDS}
    for kind, keys in expected["skipped_keys"].items():
        for key in keys:  # each message names its sample (or shard) and the shard file
            assert sum(key in e and "shard-0000" in e for e in named[kind]) == 1, (kind, key)


def test_inspect_reports_fuzzed_shards_without_raising(fuzzed, tmp_path):
    from dinor1.data.inspect import format_inspect_report, inspect_shards

    shards, expected = fuzzed
    report = inspect_shards(str(shards), grid_path=str(tmp_path / "grid.png"), grid_samples=64)
    kinds = {skip_kind(e) for e in report["errors"]}
    assert {"corrupt_shard", "bad_json", "missing_json", "refused_member"} <= kinds
    assert "other" not in kinds  # inspect does not decode images: bad_image samples count here
    assert report["num_samples"] >= len(expected["good_image_ids"])
    assert (tmp_path / "grid.png").is_file() and "unreadable samples" in \
        format_inspect_report(report)
