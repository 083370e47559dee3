"""A ZeRO-3 run resumed at another worker count, both ways (2 -> 1 -> 2 workers), as an elastic
run does at each resize: the checkpoint is converted to DeepSpeed's universal checkpoint and
re-partitioned; weights and every AdamW moment come back as saved, the data position is kept in
samples, and it all lands in one MLflow run. Real Ray Train, DeepSpeed over gloo, MLflow.
(ZeRO-2, the recommended stage, resizes under the autoscaler: tests/cluster/test_autoscaling.py;
ZeRO-1 is converted by the same code as ZeRO-2.)"""

from pathlib import Path

import mlflow
import pytest

from dinor1.config import load_train_config
from tests.helpers import synthetic_train_shards

ROOT = Path(__file__).parents[2]


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_resumes_at_another_worker_count_both_ways(ray_cluster, tmp_path):
    from dinor1.train.launch import run_training

    shards = synthetic_train_shards(tmp_path, 96, 24)
    common = [f"data.train_shards={shards}", "data.train_short_sides=[96]",
              "data.train_max_size=96", "deepspeed.zero_stage=3", "stages.max_steps_per_epoch=3",
              "checkpointing.every_steps=100", f"checkpointing.storage_path={tmp_path}",
              "mlflow.log_every_steps=1", "checkpointing.resume=true"]
    job = ROOT / "jobs" / "demo.yaml"
    # one more epoch (3 steps) per run: SFT at 2 workers, SFT at 1, GRQO at 2
    for workers, sft, grqo in ((2, 1, 0), (1, 2, 0), (2, 2, 1)):
        result = run_training(load_train_config(job, [
            *common, f"scaling.num_workers={workers}", f"stages.sft_epochs={sft}",
            f"stages.grqo_epochs={grqo}"]))
        assert result.error is None, result.error
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "demo" / "mlflow_run_id").read_text().strip()

    def at(name, step):
        values = [m.value for m in client.get_metric_history(run_id, name) if m.step == step]
        assert values, (name, step)
        return values[-1]

    resumes = sorted((m.step, m.value) for m in
                     client.get_metric_history(run_id, "resume/world_size_before"))
    assert [v for _, v in resumes] == [2.0, 1.0]  # 2 -> 1, then 1 -> 2
    assert [m.value for m in sorted(client.get_metric_history(run_id, "resume/world_size"),
                                    key=lambda m: m.step)] == [1.0, 2.0]
    for step, _ in resumes:  # what was saved at that step is what came back
        for part in ("weights", "moments"):
            assert at(f"resume/{part}_checksum", step) == pytest.approx(
                at(f"checkpoint/{part}_checksum", step), rel=1e-9), (part, step)
        assert at("resume/moments_checksum", step) != 0.0
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss/total"))
    assert steps == list(range(1, 10))  # 3 steps per run, each once, in one MLflow run
    assert [m.step for m in client.get_metric_history(run_id, "loss/grqo")] == [7, 8, 9]
    assert client.get_run(run_id).data.tags["dinor1.resized"] == "1 -> 2 workers at step 6"
