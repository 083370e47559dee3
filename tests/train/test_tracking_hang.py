"""A tracking server that accepts connections and never answers (a listening socket on
127.0.0.1): writes from the training thread return at once, close() gives up within its timeout
plus one request timeout, and nothing is lost: the spool file holds every record in order, and
delivering it (or the server answering again) puts them all into a real sqlite-backed run."""

import socket
import threading
import time
from pathlib import Path

import mlflow
import pytest

from dinor1.config import TrainConfig
from dinor1.train.checkpoints import export_final_model
from dinor1.train.mlflow_writer import SPOOL_SUFFIX, MlflowWriter, read_spool, sync_spool
from dinor1.train.settings import WorkerSettings
from dinor1.train.tracking import RankZeroTracker

REQUEST_TIMEOUT = 2.0
STEPS = 30


class SilentServer:
    """Accepts TCP connections on 127.0.0.1, holds them open and never sends a byte."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.sock.settimeout(0.1)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections.append(conn)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(REQUEST_TIMEOUT)))
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def sqlite_run(tmp_path) -> tuple[str, mlflow.MlflowClient, str]:
    """(tracking URI, client, run id) of a real sqlite-backed MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("hang", artifact_location=(tmp_path / "art").as_uri())
    return uri, client, client.create_run(experiment).info.run_id


def _log_steps(writer_or_tracker, log) -> tuple[list[dict], float]:
    """Log STEPS steps of two metrics, then a tag and the end of the run; the records expected in
    the spool, and the longest single call."""
    expected, longest = [], 0.0
    for step in range(1, STEPS + 1):
        metrics = {"loss": 1.0 / step, "lr": step * 1e-4}
        started = time.perf_counter()
        log(metrics, step)
        longest = max(longest, time.perf_counter() - started)
        expected += [{"kind": "metric", "key": k, "value": v, "step": step}
                     for k, v in metrics.items()]
    return expected, longest


def _without_timestamps(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in records]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_writes_never_wait_for_a_silent_server_and_the_spool_keeps_them(
        silent_server, sqlite_run, tmp_path, capsys):
    uri, client, run_id = sqlite_run
    writer = MlflowWriter(mlflow.MlflowClient(silent_server.uri), run_id, tmp_path / "spool",
                          tracking_uri=silent_server.uri)
    expected, longest = _log_steps(writer, writer.log_metrics)
    writer.set_tag("phase", "hung")
    writer.end_run()
    expected += [{"kind": "tag", "key": "phase", "value": "hung"}, {"kind": "end"}]
    assert longest < 0.1  # the old writer waited the whole request timeout here

    started = time.monotonic()
    summary = writer.close(timeout=0.5)
    assert time.monotonic() - started < 0.5 + REQUEST_TIMEOUT + 1.5
    assert not writer.thread.is_alive()
    assert summary["mlflow/undelivered_values"] == len(expected)
    spool = next((tmp_path / "spool").glob(f"*{SPOOL_SUFFIX}"))
    err = capsys.readouterr().err
    assert "tracking server unreachable" in err
    assert f"dinor1 mlflow sync {spool}" in err and f"(steps 1-{STEPS})" in err
    header, records = read_spool(spool)
    assert header["run_id"] == run_id and _without_timestamps(records) == expected

    assert sync_spool(spool, uri) == (run_id, len(expected))
    assert _history(client, run_id, "loss") == [(s, 1.0 / s) for s in range(1, STEPS + 1)]
    assert _history(client, run_id, "lr") == [(s, s * 1e-4) for s in range(1, STEPS + 1)]
    run = client.get_run(run_id)
    assert run.data.tags["phase"] == "hung" and run.info.status == "FINISHED"
    assert not spool.exists()


def test_delivery_resumes_in_order_when_the_server_answers_again(
        silent_server, sqlite_run, tmp_path, capsys):
    uri, client, run_id = sqlite_run
    writer = MlflowWriter(mlflow.MlflowClient(silent_server.uri), run_id, tmp_path / "spool",
                          tracking_uri=silent_server.uri, max_backoff=0.5)
    _, longest = _log_steps(writer, writer.log_metrics)
    assert longest < 0.1
    deadline = time.monotonic() + REQUEST_TIMEOUT + 5  # the first request times out: an outage
    while writer.outage_since is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.outage_since is not None
    writer.log_metrics({"loss": 0.0}, STEPS + 1)  # queued behind the others, no waiting either

    writer.client = client  # the tracking server answers again (same store behind it)
    summary = writer.close(timeout=30)
    assert summary["mlflow/undelivered_values"] == 0
    assert summary["mlflow/delayed_values"] == 2 * STEPS + 1
    assert summary["mlflow/outage_seconds"] >= REQUEST_TIMEOUT - 0.5
    assert _history(client, run_id, "loss") == (
        [(s, 1.0 / s) for s in range(1, STEPS + 1)] + [(STEPS + 1, 0.0)])
    assert not list((tmp_path / "spool").glob(f"*{SPOOL_SUFFIX}"))
    assert "tracking server back after" in capsys.readouterr().err


class _Weights:
    """Stands in for the model at the end of training: ``save_pretrained`` writes one file."""

    def save_pretrained(self, target: Path, state_dict) -> None:
        target.mkdir(parents=True, exist_ok=True)
        (target / "model.safetensors").write_bytes(b"weights")


def test_rank_zero_tracker_never_waits_for_a_silent_server(
        silent_server, sqlite_run, tmp_path, monkeypatch):
    _, _, run_id = sqlite_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())  # restored afterwards
    previous_uri = mlflow.get_tracking_uri()
    settings = WorkerSettings(
        mlflow_run_id=run_id, tracking_uri=silent_server.uri,
        mlflow_spool_dir=str(tmp_path / "spool"), total_steps=STEPS,
        train=TrainConfig.model_validate(
            {"mlflow": {"log_every_steps": 1, "final_sync_seconds": 0.5}}))
    try:
        started = time.perf_counter()
        tracker = RankZeroTracker(settings, rank=0, world=2)
        assert time.perf_counter() - started < 1.0  # the old tracker waited here, twice
        _, longest = _log_steps(tracker, lambda metrics, step: tracker.log(
            metrics, step, epoch=0, stage="sft"))
        started = time.perf_counter()
        tracker.set_tag("dinor1.workers", "[]")
        tracker.log_now({"data/skipped": 0.0}, STEPS)
        tracker.log_text("nothing skipped\n", "data/skipped_samples.txt")
        assert max(longest, time.perf_counter() - started) < 0.1

        started = time.monotonic()
        summary = tracker.finish(export_final_model(_Weights(), {}, str(tmp_path / "final")),
                                 STEPS)
        assert time.monotonic() - started < 0.5 + REQUEST_TIMEOUT + 1.5
    finally:
        mlflow.set_tracking_uri(previous_uri)
        for thread in threading.enumerate():  # the sampler's helpers: one request timeout each
            if thread.name.startswith(("mlflow-", "SystemMetricsMonitor")):
                thread.join(timeout=3 * REQUEST_TIMEOUT + 1)
    # the world_size tag, the steps, the three writes above, the weights, the end of the run
    assert summary["mlflow/undelivered_values"] == 1 + 2 * STEPS + 3 + 2
    _, records = read_spool(next(Path(tmp_path / "spool").glob(f"*{SPOOL_SUFFIX}")))
    assert [r.get("key", r["kind"]) for r in records[:3]] == ["world_size", "loss", "lr"]
    assert [r.get("key", r["kind"]) for r in records[-5:]] == [
        "dinor1.workers", "data/skipped", "text", "artifacts", "end"]
