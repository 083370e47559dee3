"""The main job end to end: real Ray Train (2 CPU workers), real DeepSpeed ZeRO-2 over gloo,
real Ray Data over synthetic shards, real MLflow on a sqlite file."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from dinor1.config import load_train_config
from dinor1.model.dino_r1 import DinoR1
from tests.helpers import synthetic_train_shards

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synthetic_train_shards(out, 240, 40)


@pytest.mark.ray
@pytest.mark.slow
def test_sft_then_grqo_tracked_in_mlflow(ray_cluster, shards, tmp_path):
    from dinor1.train.launch import run_training

    cfg = load_train_config(ROOT / "jobs" / "demo.yaml", [
        f"data.train_shards={shards}", "data.train_short_sides=[96]", "data.train_max_size=96",
        "stages.max_steps_per_epoch=40", "stages.sft_epochs=1", "stages.grqo_epochs=1",
        "checkpointing.every_steps=30", f"checkpointing.storage_path={tmp_path}",
        "mlflow.log_every_steps=1", "optimizer.lr=1e-3",
    ])
    result = run_training(cfg)
    assert result.error is None and result.checkpoint is not None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = (tmp_path / "demo" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert run.data.params["model.init"] == "tiny-cpu"
    assert run.data.tags["world_size"] == "2"
    assert {m.value for m in client.get_metric_history(run_id, "train/autocast_bf16")} == {0.0}
    history = [m.value for m in client.get_metric_history(run_id, "loss/total")]
    # 240 images / (batch 4 x 2 workers) = 30 steps per epoch, SFT then GRQO
    assert len(history) == 60 and all(v == v for v in history)  # finite, every step
    sft = history[:30]
    assert sum(sft[-10:]) / 10 < sum(sft[:10]) / 10  # SFT loss goes down
    assert client.get_metric_history(run_id, "grqo/kl_mean")
    assert client.get_metric_history(run_id, "train/data_wait_fraction")
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"final_model", "resolved_config.yaml"} <= artifacts
    model = DinoR1.from_pretrained(str(tmp_path / "demo" / "final_model"))
    assert model.config.num_queries == 50


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_grqo_step_with_reference(ray_cluster, shards, tmp_path):
    """ZeRO-3 (here in bf16) partitions the weights: the reference is built from gathered ones
    and the GRQO step (which reads some parameters directly) runs; the exported weights are
    complete; the end-of-epoch evaluation (every rank forwards its val split) runs on the
    partitioned model."""
    from dinor1.train.launch import run_training

    val = synthetic_train_shards(tmp_path / "val", 40, 10)  # (a short evaluation)
    cfg = load_train_config(ROOT / "jobs" / "demo.yaml", [
        f"data.train_shards={shards}", "data.train_short_sides=[96]", "data.train_max_size=96",
        "deepspeed.zero_stage=3", "deepspeed.precision=bf16",
        "stages.sft_epochs=0", "stages.grqo_epochs=1",
        "stages.max_steps_per_epoch=2", f"checkpointing.storage_path={tmp_path}",
        "mlflow.log_every_steps=1", "eval.every_epochs=1", f"data.val_shards={val}",
        f"eval.support_shards={val}", "data.eval_short_side=96", "data.eval_max_size=96",
        "eval.prompts_per_class=2",
    ])
    result = run_training(cfg)
    assert result.error is None
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "demo" / "mlflow_run_id").read_text().strip()
    evaluated = client.get_metric_history(run_id, "eval/generic/AP")
    assert len(evaluated) == 1 and 0.0 <= evaluated[0].value <= 1.0
    assert client.get_metric_history(run_id, "eval/images")[0].value == 40
    grqo = client.get_metric_history(run_id, "loss/grqo")
    assert len(grqo) == 2 and all(m.value == m.value for m in grqo)
    assert client.get_metric_history(run_id, "reference/param_megabytes")[0].value > 0
    # bf16: fp32 weights, the forward under torch.autocast inside the DeepSpeed engine
    assert [m.value for m in client.get_metric_history(run_id, "train/autocast_bf16")] == [1, 1]
    exported = DinoR1.from_pretrained(str(tmp_path / "demo" / "final_model"))
    assert all(p.numel() > 0 for p in exported.parameters())


@pytest.mark.ray
@pytest.mark.slow
def test_resume_restores_state_into_the_same_mlflow_run(ray_cluster, shards, tmp_path):
    """Run 1: SFT then GRQO, ending with a checkpoint. Run 2 (same run folder, one more GRQO
    epoch): Ray Train restores that checkpoint; weights, optimiser state (rank 0's part) and
    the reference model equal what was saved, the step count goes on, and the metrics land in
    the same MLflow run."""
    from dinor1.train.diagnostics import weight_checksum
    from dinor1.train.launch import run_training

    common = [f"data.train_shards={shards}", "data.train_short_sides=[96]",
              "data.train_max_size=96", "stages.max_steps_per_epoch=2",
              f"checkpointing.storage_path={tmp_path}", "mlflow.log_every_steps=1",
              "checkpointing.every_steps=100", "stages.sft_epochs=1"]
    job = ROOT / "jobs" / "demo.yaml"
    assert run_training(load_train_config(job, [*common, "stages.grqo_epochs=1"])).error is None
    run_id = (tmp_path / "demo" / "mlflow_run_id").read_text().strip()
    exported = DinoR1.from_pretrained(str(tmp_path / "demo" / "final_model"))

    # a finished run with other settings is only re-entered when asked to (see test_rerun.py)
    result = run_training(load_train_config(job, [*common, "stages.grqo_epochs=2",
                                                  "checkpointing.resume=true"]))
    assert result.error is None
    assert (tmp_path / "demo" / "mlflow_run_id").read_text().strip() == run_id
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def at_step_4(name):
        values = [m.value for m in client.get_metric_history(run_id, name) if m.step == 4]
        assert values, name
        return values[0]

    for part in ("weights", "optimizer", "reference"):
        saved = at_step_4(f"checkpoint/{part}_checksum")
        assert at_step_4(f"resume/{part}_checksum") == pytest.approx(saved, rel=1e-9), part
    assert at_step_4("resume/weights_checksum") == pytest.approx(
        weight_checksum(exported.state_dict()), rel=1e-9)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss/total"))
    assert steps == [1, 2, 3, 4, 5, 6]  # SFT 1-2 and GRQO 3-4 in run 1, GRQO 5-6 after restore
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss/grqo")) == [3, 4, 5, 6]
    tags = client.get_run(run_id).data.tags
    assert tags["dinor1.resumed_with"] == "stages.grqo_epochs: 1 -> 2"


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stag=3", "'deepspeed.zero_stag': unknown key"),
    ("data.batch_size=four", "'data.batch_size'"),
    ("grqo.form=ppo", "'grqo.form'"),
    ("data.train_shards=/nonexistent/shards", "not found"),
    ("data.batch_size=0", "'data.batch_size'"),
    ("scaling.min_workers=2", "scaling.min_workers and scaling.max_workers go together"),
    ("scaling.gpus_per_worker=1", "scaling.gpus_per_worker needs scaling.use_gpu=true"),
    ("deepspeed.precision=fp16", "deepspeed.precision fp16 needs scaling.use_gpu"),
    ("faults.max_consecutive_nonfinite=0", "'faults.max_consecutive_nonfinite'"),
    ("model.compile_mode=fastest", "'model.compile_mode'"),
])
def test_config_errors_are_one_line(override, message, tmp_path):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dinor1"), "train", str(ROOT / "jobs" / "demo.yaml"),
         override, f"checkpointing.storage_path={tmp_path}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dinor1: error:") and message in last and "Traceback" not in proc.stderr


def test_compile_is_refused_with_zero3():
    from dinor1.errors import UserError

    with pytest.raises(UserError, match="model.compile needs deepspeed.zero_stage 0, 1 or 2"):
        load_train_config(ROOT / "jobs" / "demo.yaml",
                          ["model.compile=true", "deepspeed.zero_stage=3"])
    assert load_train_config(ROOT / "jobs" / "demo.yaml", ["model.compile=true"]).model.compile


def test_elastic_workers_take_every_zero_stage():
    from dinor1.errors import UserError

    elastic = ["scaling.min_workers=1", "scaling.max_workers=4"]
    for stage in (0, 1, 2, 3):
        cfg = load_train_config(ROOT / "jobs" / "demo.yaml",
                                [*elastic, f"deepspeed.zero_stage={stage}"])
        assert (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 4)
    with pytest.raises(UserError, match="scaling.min_workers and scaling.max_workers go together"):
        load_train_config(ROOT / "jobs" / "demo.yaml", ["scaling.min_workers=1"])


def test_unreachable_tracking_server_is_one_line(tmp_path):
    from dinor1.local_cluster import free_port
    from tests.helpers import synthetic_train_shards

    shards = synthetic_train_shards(tmp_path, 8, 8)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dinor1"), "train", str(ROOT / "jobs" / "demo.yaml"),
         f"data.train_shards={shards}", f"mlflow.tracking_uri={uri}",
         f"checkpointing.storage_path={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dinor1: error: mlflow.tracking_uri {uri}: the tracking server does "
                           "not answer") and "nothing was started" in last
    assert "Traceback" not in proc.stderr


def test_a_refused_connection_is_named_without_waiting_for_retries():
    import socket

    from dinor1.local_cluster import free_port
    from dinor1.train.launch import _connection_refused

    port = free_port()
    assert _connection_refused(f"http://127.0.0.1:{port}") == (
        f"connection refused by 127.0.0.1:{port}")
    with socket.socket() as listening:  # accepts: left to MLflow's requests (and their timeout)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert _connection_refused(f"http://127.0.0.1:{listening.getsockname()[1]}") is None
    assert _connection_refused("sqlite:///runs/mlflow.db") is None
    assert _connection_refused("databricks") is None


@pytest.mark.parametrize("gpus", ["2", "0.5"])
def test_gpus_per_worker_other_than_one_is_refused(gpus):
    from dinor1.errors import UserError

    with pytest.raises(UserError, match=f"scaling.gpus_per_worker must be 1 .* got {gpus}"):
        load_train_config(ROOT / "jobs" / "demo.yaml",
                          ["scaling.use_gpu=true", f"scaling.gpus_per_worker={gpus}"])
    assert load_train_config(ROOT / "jobs" / "demo.yaml", [
        "scaling.use_gpu=true", "scaling.gpus_per_worker=1"]).scaling.gpus_per_worker == 1
