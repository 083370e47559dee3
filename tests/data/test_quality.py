"""Skip kinds, the per-batch count tensors and QualityCounter's sums (across real gloo ranks)."""

import json

import numpy as np
import pytest
import torch

from dinor1.data.collate import DetectionCollateFn
from dinor1.data.quality import (
    DROP_RULES,
    SKIP_KINDS,
    QualityCounter,
    decode_errors,
    encode_errors,
    skip_error,
    skip_kind,
)


def _rows(errors: list[str], dropped: list[list[int]], clipped: list[int]) -> dict:
    n = len(errors)
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "error": np.array(errors, dtype=object),
        "image": np.array([np.zeros((8, 8, 3), np.uint8)] * n + [None], dtype=object)[:n],
        "boxes": np.array([np.zeros((0, 4), np.float32)] * n + [None], dtype=object)[:n],
        "labels": np.array([np.zeros(0, np.int64)] * n + [None], dtype=object)[:n],
        "image_id": np.arange(n),
        "orig_size": np.array([[8, 8]] * n),
        "dropped_boxes": np.array([sum(d) for d in dropped]),
        "dropped_by_rule": np.array(dropped, np.int64),
        "clipped_boxes": np.array(clipped),
    }


def test_kinds_round_trip_and_unknown_errors_are_other():
    for kind in SKIP_KINDS:
        assert skip_kind(skip_error(kind, "sample 'a' in s.tar: why")) == kind
    assert skip_kind("sample 'a' in s.tar: an error from elsewhere") == "other"
    with pytest.raises(ValueError, match="unknown skip kind"):
        skip_error("nope", "x")
    assert decode_errors(encode_errors([])) == [] and encode_errors([]).dtype == torch.uint8
    assert decode_errors(encode_errors(["é one", "two\nlines"])) == ["é one", "two lines"]


def test_collate_counts_by_kind_and_rule():
    errors = ["", skip_error("bad_image", "sample 'b' in s.tar: x"), "",
              skip_error("bad_image", "sample 'd' in s.tar: y"), "legacy message"]
    dropped = [[1, 0, 2], [0, 0, 0], [0, 3, 0], [0, 0, 0], [0, 0, 0]]
    batch = DetectionCollateFn(train=False)(_rows(errors, dropped, [1, 0, 2, 0, 0]))
    by_kind = dict(zip(SKIP_KINDS, batch["skipped_by_kind"].tolist()))
    assert by_kind["bad_image"] == 2 and by_kind["other"] == 1 and sum(by_kind.values()) == 3
    assert batch["num_skipped"] == 3 and batch["dropped_boxes"] == 6
    assert batch["dropped_by_rule"].tolist() == [1, 3, 2] and batch["clipped_boxes"] == 3
    assert decode_errors(batch["skipped_errors"]) == [e for e in errors if e]
    clean = DetectionCollateFn(train=False)(_rows([""], [[0, 0, 0]], [0]))
    assert clean["skipped_errors"].numel() == 0 and clean["skipped_by_kind"].sum() == 0


def test_counter_sums_batches_keeps_first_messages_and_resumes():
    collate = DetectionCollateFn(train=False)
    quality = QualityCounter(max_errors=3)
    for i in range(4):
        errors = ["", skip_error("bad_json", f"sample 'j{i}' in s.tar: x"),
                  skip_error("corrupt_shard", f"shard s{i}.tar is truncated or corrupt: x")]
        quality.update(collate(_rows(errors, [[i, 1, 0], [0, 0, 0], [0, 0, 0]], [1, 0, 0])))
    metrics = quality.metrics("data/")  # no process group: this process's counts
    assert metrics["data/skipped_samples"] == 8
    assert metrics["data/skipped/bad_json"] == metrics["data/skipped/corrupt_shard"] == 4
    assert metrics["data/skipped/other"] == 0
    assert metrics["data/dropped_boxes"] == 10 and metrics["data/clipped_boxes"] == 4
    assert metrics["data/dropped_boxes/unknown_category"] == 6
    assert metrics["data/dropped_boxes/invalid_box"] == 4
    assert len(metrics) == 3 + len(SKIP_KINDS) + len(DROP_RULES)
    assert quality.errors == [  # the first three
        "bad_json: sample 'j0' in s.tar: x",
        "corrupt_shard: shard s0.tar is truncated or corrupt: x",
        "bad_json: sample 'j1' in s.tar: x"]
    saved = json.loads(json.dumps(quality.state_dict()))
    resumed = QualityCounter.from_state_dict(saved, max_errors=3)
    assert resumed.metrics("data/") == metrics and resumed.errors == quality.errors
    resumed.load_state_dict({"skipped": {"a_kind_from_the_future": 2}})
    assert resumed.skipped["other"] == 2 and resumed.dropped_boxes == 0
    other = QualityCounter()
    other.add_skipped([skip_error("missing_json", "sample 'z' in t.tar: no .json member")])
    other.add_boxes([0, 0, 5], clipped=1)
    quality.merge(other)
    assert quality.skipped["missing_json"] == 1 and quality.dropped["box_outside_image"] == 5


def _rank_counts(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    quality = QualityCounter()
    quality.add_skipped([skip_error("bad_image", f"sample 'r{rank}' in s.tar: x")] * (rank + 1))
    quality.add_boxes([rank, 1, 0], clipped=2)
    metrics = quality.metrics("eval/")
    errors = quality.gather_errors()
    local = quality.metrics("eval/", reduce=False)
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"metrics": metrics, "errors": errors, "local": local}, f)


def test_metrics_sum_over_ranks_with_one_all_reduce(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_rank_counts, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["metrics"]["eval/skipped/bad_image"] == 3  # 1 + 2, on every rank
        assert got["metrics"]["eval/dropped_boxes/unknown_category"] == 1
        assert got["metrics"]["eval/dropped_boxes"] == 3
        assert got["metrics"]["eval/clipped_boxes"] == 4
        assert got["local"]["eval/skipped_samples"] == rank + 1
        assert got["errors"] == ["bad_image: sample 'r0' in s.tar: x"] + \
            ["bad_image: sample 'r1' in s.tar: x"] * 2
