"""Evaluation inside training, on one process: fuzzed val shards are counted like `dinor1 eval`."""

import pytest

from dinor1.config import DataConfig
from dinor1.data.pipeline import detection_dataset, iter_detection_batches
from dinor1.eval.during_training import evaluate_during_training
from tests.fuzz_shards import build_fuzzed_shards, expected_metrics


@pytest.mark.ray
def test_fuzzed_val_set_counts_reach_the_metrics(ray_cluster, tmp_path):
    from dinor1.data.pipeline import open_shard_set
    from dinor1.eval.evaluate import ModelSource, dataset_categories, load_model

    shards, expected = build_fuzzed_shards(tmp_path)
    cfg = DataConfig(batch_size=8, eval_short_side=64, eval_max_size=96)

    def batches():
        return iter_detection_batches(detection_dataset(str(shards), cfg, train=False), cfg,
                                      train=False, device="cpu")

    errors: list[str] = []
    metrics = evaluate_during_training(
        load_model(ModelSource("tiny-cpu")), batches(), batches(),
        dataset_categories(open_shard_set(str(shards)).manifest), per_class=2, top_k=20,
        chunk_size=80, skipped_errors=errors)
    want = expected_metrics(expected, "eval/")
    assert {k: metrics[k] for k in want} == want
    assert metrics["eval/images"] == len(expected["good_image_ids"])
    assert 0.0 <= metrics["eval/generic/AP"] <= 1.0
    assert len(errors) == expected["skipped_samples"]  # 22 < 50 kept per rank
    assert all(e.split(":", 1)[0] in expected["skipped"] for e in errors)
