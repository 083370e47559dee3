"""Training (2 DeepSpeed workers on Ray Train, an evaluation inside it) on shards holding every
kind of bad input: the run completes, and the skipped samples and dropped boxes, by kind, reach
the MLflow run with the exact counts the shards hold. Batches travel as uint8 and are normalised
on the (here CPU) device, as on a GPU worker."""

from pathlib import Path

import mlflow
import pytest

from dinor1.config import load_train_config
from tests.fuzz_shards import build_fuzzed_shards, expected_metrics

ROOT = Path(__file__).parents[2]


@pytest.mark.ray
@pytest.mark.slow
def test_training_and_eval_on_fuzzed_shards(ray_cluster, tmp_path):
    from dinor1.train.launch import run_training

    shards, expected = build_fuzzed_shards(tmp_path / "fuzz")
    cfg = load_train_config(ROOT / "jobs" / "demo.yaml", [
        f"data.train_shards={shards}", f"data.val_shards={shards}",
        f"eval.support_shards={shards}", "eval.every_epochs=2", "eval.prompts_per_class=2",
        "data.train_short_sides=[64]", "data.train_max_size=96", "data.eval_short_side=64",
        "data.eval_max_size=96", "stages.sft_epochs=1", "stages.grqo_epochs=1",
        "checkpointing.every_steps=3", f"checkpointing.storage_path={tmp_path / 'runs'}",
        "mlflow.log_every_steps=1",
        "data.normalize_on=device"])  # (a GPU worker's default: uint8 batches, even empty ones)
    result = run_training(cfg)
    assert result.error is None

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = (tmp_path / "runs" / "demo" / "mlflow_run_id").read_text().strip()
    metrics = client.get_run(run_id).data.metrics  # the latest value of each
    want = {**expected_metrics(expected, "data/", epochs=2), **expected_metrics(expected, "eval/")}
    assert {k: metrics.get(k) for k in want} == want
    assert metrics["eval/images"] == len(expected["good_image_ids"])
    losses = [m.value for m in client.get_metric_history(run_id, "loss/total")]
    assert losses and all(v == v and abs(v) != float("inf") for v in losses)
    # the messages name each bad sample (and its shard)
    text = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="data/skipped_samples.txt", tracking_uri=client.tracking_uri,
        dst_path=str(tmp_path / "dl"))).read_text()
    for kind, keys in expected["skipped_keys"].items():
        for key in keys:  # a sample key, or the shard's file name for a corrupt shard
            assert (f"{kind}: sample '{key}'" in text
                    or (kind == "corrupt_shard" and f"{key} is truncated" in text)), (kind, key)
