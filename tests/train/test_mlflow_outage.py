"""The MLflow tracking server going away during training, on the real thing: an `mlflow server`
on 127.0.0.1 stopped and started again on the same port (same database). Training never stops for
it; what is logged meanwhile is kept (in memory and a spool file) and delivered when the server
is back, or named at the end and sent later with `dinor1 mlflow sync`. (A server that accepts
connections and never answers: tests/train/test_tracking_hang.py.)"""

import threading
import time
from pathlib import Path

import mlflow
import pytest

from dinor1.cli import main
from dinor1.config import load_train_config
from dinor1.train.mlflow_writer import SPOOL_SUFFIX, MlflowWriter
from tests.helpers import MlflowServer, synthetic_train_shards

ROOT = Path(__file__).parents[2]


@pytest.fixture
def server(tmp_path, monkeypatch):
    # what the training worker sets for itself: no minutes of MLflow-internal retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = MlflowServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def _new_run(uri: str) -> tuple[mlflow.MlflowClient, str]:
    client = mlflow.MlflowClient(uri)
    return client, client.create_run(client.create_experiment("outage")).info.run_id


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_writes_during_an_outage_are_kept_and_delivered(server, tmp_path, capsys):
    client, run_id = _new_run(server.uri)
    writer = MlflowWriter(client, run_id, tmp_path / "spool", tracking_uri=server.uri,
                          max_backoff=1.0)
    writer.log_metrics({"loss": 1.0}, 1)
    assert writer.flush(timeout=30) == 0  # (sent by the writer's thread)
    assert not list((tmp_path / "spool").glob("*"))  # healthy: delivered, nothing kept

    server.stop()
    started = time.monotonic()
    writer.log_metrics({"loss": 2.0}, 2)
    writer.set_tag("phase", "outage")
    writer.log_metrics({"loss": 3.0}, 3)
    assert time.monotonic() - started < 10  # training is not held up
    err, deadline = "", time.monotonic() + 10  # (the writer's thread finds out)
    while "tracking server unreachable" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capsys.readouterr().err
    assert "tracking server unreachable" in err
    spools = list((tmp_path / "spool").glob(f"*{SPOOL_SUFFIX}"))
    assert len(spools) == 1 and len(spools[0].read_text().splitlines()) == 4  # header + 3

    server.start()
    summary = writer.close(timeout=60)
    assert summary["mlflow/undelivered_values"] == 0
    assert summary["mlflow/delayed_values"] == 3 and summary["mlflow/outage_seconds"] > 0
    assert _history(client, run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(run_id).data.tags["phase"] == "outage"
    assert not spools[0].exists()
    assert "tracking server back after" in capsys.readouterr().err

    # a write MLflow refuses (an invalid metric name) is reported and counted, not retried
    writer.log_metrics({"bad?name": 1.0}, 4)
    assert writer.close(timeout=5)["mlflow/rejected_values"] == 1
    assert "rejected 1 record(s) (bad?name)" in capsys.readouterr().err


def test_undelivered_writes_are_named_and_sent_by_mlflow_sync(server, tmp_path, capsys):
    client, run_id = _new_run(server.uri)
    writer = MlflowWriter(client, run_id, tmp_path / "spool", tracking_uri=server.uri)
    server.stop()
    for step in range(1, 4):
        writer.log_metrics({"loss": float(step)}, step)
    writer.end_run()
    summary = writer.close(timeout=1)
    assert summary["mlflow/undelivered_values"] == 4
    err = capsys.readouterr().err
    spool = next((tmp_path / "spool").glob(f"*{SPOOL_SUFFIX}"))
    assert f"dinor1 mlflow sync {spool}" in err and "(steps 1-3)" in err

    assert main(["mlflow", "sync", str(tmp_path / "spool")]) == 2  # still down: kept
    assert spool.exists() and "the file is kept" in capsys.readouterr().err
    server.start()
    assert main(["mlflow", "sync", str(tmp_path / "spool")]) == 0
    assert _history(client, run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not spool.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_training_goes_on_through_an_mlflow_outage(ray_cluster, server, tmp_path):
    from dinor1.train.launch import run_training

    steps = 24  # per worker, 2 workers
    shards = synthetic_train_shards(tmp_path / "data", steps * 2 * 4, 32)
    cfg = load_train_config(ROOT / "jobs" / "demo.yaml", [
        f"data.train_shards={shards}", "data.batch_size=4", "data.train_short_sides=[96]",
        "data.train_max_size=96", f"stages.max_steps_per_epoch={steps}", "stages.sft_epochs=1", "stages.grqo_epochs=0",
        "checkpointing.every_steps=4", f"checkpointing.storage_path={tmp_path / 'runs'}",
        "mlflow.log_every_steps=1", f"mlflow.tracking_uri={server.uri}"])
    run_folder = tmp_path / "runs" / "demo"
    outage: dict[str, float] = {}

    def take_the_server_away():
        # once training is logging: stop the server until two more checkpoints were written
        client = mlflow.MlflowClient(server.uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                run_id = (run_folder / "mlflow_run_id").read_text().strip()
                if len(client.get_metric_history(run_id, "loss/total")) >= 2:
                    break
            except Exception:  # noqa: BLE001 - the run is not there yet
                pass
            time.sleep(0.2)
        before = len(list(run_folder.glob("checkpoint_*")))
        server.stop()
        outage["stopped"] = time.monotonic()
        while (len(list(run_folder.glob("checkpoint_*"))) < before + 2
               and time.monotonic() < deadline):
            time.sleep(0.2)
        outage["checkpoints_while_down"] = len(list(run_folder.glob("checkpoint_*"))) - before
        server.start()

    chaos = threading.Thread(target=take_the_server_away, daemon=True)
    chaos.start()
    result = run_training(cfg)
    chaos.join(timeout=120)
    assert result.error is None
    assert outage["checkpoints_while_down"] >= 2  # training went on while the server was gone

    client = mlflow.MlflowClient(server.uri)
    run_id = (run_folder / "mlflow_run_id").read_text().strip()
    # every step's loss arrived, once, in order of steps
    assert [s for s, _ in _history(client, run_id, "loss/total")] == list(range(1, steps + 1))
    run = client.get_run(run_id)
    assert run.data.metrics["mlflow/outage_seconds"] > 0
    assert run.data.metrics["mlflow/delayed_values"] > 0
    assert run.info.status == "FINISHED"
    assert any(a.path == "final_model" for a in client.list_artifacts(run_id))
    assert not list((run_folder / "mlflow_spool").glob(f"*{SPOOL_SUFFIX}"))
