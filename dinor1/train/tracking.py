"""MLflow tracking from rank 0 inside the training function, and the progress line.

The driver creates the experiment (with an explicit artifact location) and the run, and passes
the run id to the workers, so a restarted worker group keeps logging into the SAME run. Writes
go through :class:`MlflowWriter`, which keeps training going through a tracking-server outage
and delivers what was logged meanwhile when the server is back.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

SPOOL_SUFFIX = ".mlflow-spool.jsonl"
MAX_RECORDS_PER_CALL = 1000  # MLflow's log_batch limit for metrics


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def rejected(exc: BaseException) -> bool:
    """Whether MLflow refused the write itself (retrying cannot help) rather than being out of
    reach."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429


def deliver(client, run_id: str, records: list[dict]) -> None:
    """Send writer records to MLflow in order (consecutive metrics and tags in batches)."""
    from mlflow.entities import Metric, RunTag

    i = 0
    while i < len(records):
        kind = records[i]["kind"]
        if kind in ("metric", "tag"):
            j = i
            while j < len(records) and records[j]["kind"] == kind and j - i < MAX_RECORDS_PER_CALL:
                j += 1
            if kind == "metric":
                client.log_batch(run_id, metrics=[
                    Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records[i:j]])
            else:
                client.log_batch(run_id, tags=[RunTag(r["key"], r["value"]) for r in records[i:j]])
            i = j
            continue
        if kind == "artifacts":
            client.log_artifacts(run_id, records[i]["path"], records[i]["artifact_path"])
        elif kind == "text":
            client.log_text(run_id, records[i]["text"], records[i]["artifact_file"])
        elif kind == "end":
            client.set_terminated(run_id)
        i += 1


def read_spool(path: Path) -> tuple[dict, list[dict]]:
    """(header: run id and tracking URI, records) of a spool file; a line cut short by a killed
    process is ignored."""
    header, records = None, []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "run":
            header = record
        else:
            records.append(record)
    if header is None:
        raise ValueError(f"{path}: not a dinor1 MLflow spool file (no run id)")
    return header, records


def spool_files(location: Path, run_id: str | None = None) -> list[Path]:
    """Spool files in a folder (of one run, when given), oldest first; or the file itself."""
    location = Path(location)
    if location.is_file():
        return [location]
    pattern = f"{run_id}-*{SPOOL_SUFFIX}" if run_id else f"*{SPOOL_SUFFIX}"
    return sorted(location.glob(pattern), key=lambda p: p.stat().st_mtime)


def sync_spool(path: Path, tracking_uri: str | None = None) -> tuple[str, int]:
    """Deliver one spool file's records (to ``tracking_uri``, default: the one it was written
    for), then delete it; returns (run id, records sent)."""
    import mlflow

    header, records = read_spool(path)
    client = mlflow.MlflowClient(tracking_uri or header.get("tracking_uri") or None)
    for start in range(0, len(records), MAX_RECORDS_PER_CALL):
        deliver(client, header["run_id"], records[start:start + MAX_RECORDS_PER_CALL])
    Path(path).unlink()
    return header["run_id"], len(records)


class MlflowWriter:
    """Delivers one run's MLflow writes (metrics, tags, artifacts, the end of the run) in order,
    without ever stopping training when the tracking server is unreachable.

    While MLflow answers, each write is sent at once. When a write fails for a reason that may
    pass (connection refused, timeout, a 5xx, a locked sqlite file), an outage begins: this and
    every later write are kept in memory AND appended to a spool file (JSON lines, so a process
    killed during the outage loses nothing), and a background thread retries with backoff. When
    the server answers again, everything kept is delivered in order, the spool file is deleted,
    and the outage is recorded in the run (``mlflow/outage_seconds``, ``mlflow/delayed_values``).
    Spool files left by a killed process are delivered by the next writer of the same run, or
    by ``dinor1 mlflow sync``; delivering a record twice is harmless (MLflow ignores an
    identical metric, tags and artifacts overwrite). A write MLflow rejects (a 4xx) is reported
    on stderr and counted, never retried.
    """

    def __init__(self, client, run_id: str, spool_dir: Path | None, *, tracking_uri: str = "",
                 max_backoff: float = 30.0):
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.spool: Path | None = None
        self.pending: list[dict] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.retrying = False  # a retry thread owns ``pending`` (set and cleared under the lock)
        self.closed = False  # after close(): no more retrying; what is left stays in the spool
        self.max_backoff = max_backoff
        self.outage_since: float | None = None
        self.outage_seconds = 0.0
        self.delayed = 0  # records delivered after an outage
        self.rejected_count = 0
        self.last_error = ""

    # -- writes ---------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.write([{"kind": "metric", "key": k, "value": float(v), "timestamp": now,
                     "step": int(step)} for k, v in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self.write([{"kind": "tag", "key": key, "value": str(value)}])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.write([{"kind": "artifacts", "path": str(local_dir), "artifact_path": artifact_path}])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.write([{"kind": "text", "text": text, "artifact_file": artifact_file}])

    def end_run(self) -> None:
        self.write([{"kind": "end"}])

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        with self.lock:
            if self.pending:  # an outage is on: keep the order
                self._keep(records)
                return
        try:
            deliver(self.client, self.run_id, records)
        except Exception as exc:  # noqa: BLE001 - MLflow/requests/sqlite raise many types
            if rejected(exc):
                self._report_rejected(records, exc)
                return
            with self.lock:
                self._begin_outage(exc)
                self._keep(records)

    # -- outage handling ------------------------------------------------------------------
    def _keep(self, records: list[dict]) -> None:
        self.pending.extend(records)
        if self.spool_dir is not None:
            if self.spool is None:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
                self.spool = self.spool_dir / (
                    f"{self.run_id}-{os.getpid()}-{time.time_ns()}{SPOOL_SUFFIX}")
                with self.spool.open("w") as f:
                    f.write(json.dumps({"kind": "run", "run_id": self.run_id,
                                        "tracking_uri": self.tracking_uri}) + "\n")
            with self.spool.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def _begin_outage(self, exc: BaseException) -> None:
        self.last_error = one_line(exc)
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            print(f"[mlflow] tracking server unreachable ({self.last_error}); training goes on, "
                  "metrics are kept and will be sent when it is back", file=sys.stderr,
                  flush=True)
        if not self.retrying and not self.closed:
            self.retrying = True
            self.thread = threading.Thread(target=self._retry, name="mlflow-retry", daemon=True)
            self.thread.start()

    def _retry(self) -> None:
        backoff = 1.0
        while True:
            self.wake.wait(backoff)
            self.wake.clear()
            with self.lock:
                batch = self.pending[:MAX_RECORDS_PER_CALL]
                if not batch or self.closed:
                    self.retrying = False
                    return
            try:
                deliver(self.client, self.run_id, batch)
            except Exception as exc:  # noqa: BLE001
                if rejected(exc):
                    self._report_rejected(batch, exc)
                else:
                    self.last_error = one_line(exc)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
            else:
                self.delayed += len(batch)
            backoff = 0.0  # drain what is kept without waiting
            with self.lock:
                del self.pending[:len(batch)]
                if self.pending:
                    continue
                seconds = time.monotonic() - (self.outage_since or time.monotonic())
                self.outage_seconds += seconds
                self.outage_since = None
                if self.spool is not None:
                    self.spool.unlink(missing_ok=True)
                    self.spool = None
                self.retrying = False
                print(f"[mlflow] tracking server back after {seconds:.0f} s; {self.delayed} "
                      "kept records delivered so far", file=sys.stderr, flush=True)
                return

    def _report_rejected(self, records: list[dict], exc: BaseException) -> None:
        self.rejected_count += len(records)
        print(f"[mlflow] the server rejected {len(records)} record(s) "
              f"({', '.join(sorted({r.get('key', r['kind']) for r in records})[:5])}): "
              f"{one_line(exc)}", file=sys.stderr, flush=True)

    def close(self, timeout: float) -> dict[str, float]:
        """Wait up to ``timeout`` s for kept writes; report what happened. What was not delivered
        by then stays in the spool file (named on stderr) and is no longer retried here."""
        deadline = time.monotonic() + timeout
        while self.thread is not None and self.thread.is_alive() and time.monotonic() < deadline:
            self.wake.set()
            self.thread.join(min(1.0, max(0.0, deadline - time.monotonic())))
        with self.lock:
            left = list(self.pending)
            self.closed = bool(left)  # the retry thread stops; the spool file holds the rest
            self.wake.set()
        if self.closed and self.thread is not None:
            self.thread.join(timeout=30)  # (at most one request in flight)
        summary = {"mlflow/outage_seconds": self.outage_seconds,
                   "mlflow/delayed_values": float(self.delayed),
                   "mlflow/rejected_values": float(self.rejected_count),
                   "mlflow/undelivered_values": float(len(left))}
        if left:
            steps = [r["step"] for r in left if r["kind"] == "metric"]
            span = f" (steps {min(steps)}-{max(steps)})" if steps else ""
            print(f"[mlflow] tracking server still unreachable at the end ({self.last_error}): "
                  f"{len(left)} records{span} were not delivered; they are kept in {self.spool}; "
                  f"send them with: dinor1 mlflow sync {self.spool}", file=sys.stderr, flush=True)
        return summary


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def worker_placement(rank: int) -> dict:
    """Where this worker runs: its Ray node, IP and PID (gathered into the run's tags)."""
    import os

    import ray

    context = ray.get_runtime_context()
    return {"rank": rank, "node_id": context.get_node_id(), "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address()}


def gather_placements(rank: int, **extra) -> list[dict]:
    """Every rank's :func:`worker_placement` (plus ``extra``), in rank order, on every rank."""
    import torch.distributed as dist

    mine = {**worker_placement(rank), **extra}
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


class RankZeroTracker:
    """Logs metrics and prints progress on rank 0; does nothing on other ranks.

    Writes go through an :class:`MlflowWriter` (a tracking-server outage never stops training).
    At start it first delivers spool files an earlier attempt of the same run left behind.
    """

    def __init__(self, config: dict, rank: int, world: int):
        self.enabled = rank == 0 and config.get("mlflow_run_id") is not None
        self.rank = rank
        self.every = config["train"]["mlflow"]["log_every_steps"]
        self.sync_seconds = config["train"]["mlflow"].get("final_sync_seconds", 60)
        self.total_steps = config.get("total_steps")
        self.started = time.time()
        self.run_id = config.get("mlflow_run_id")
        self.final_dir = config.get("final_model_dir")
        self.system_metrics = False
        if self.enabled:
            import mlflow

            # fail fast into the writer's own retries rather than MLflow's (minutes of backoff)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            mlflow.set_tracking_uri(config["tracking_uri"])
            spool_dir = config.get("mlflow_spool_dir")
            self.writer = MlflowWriter(mlflow.MlflowClient(config["tracking_uri"]), self.run_id,
                                       Path(spool_dir) if spool_dir else None,
                                       tracking_uri=config["tracking_uri"])
            if spool_dir and Path(spool_dir).is_dir():
                for path in spool_files(Path(spool_dir), self.run_id):  # a killed attempt's
                    _, records = read_spool(path)
                    path.unlink()
                    self.writer.write(records)
            self.writer.set_tag("world_size", str(world))
            try:  # the fluent run only drives MLflow's system-metrics sampler (CPU, memory, GPU)
                mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
                self.system_metrics = True
            except Exception as exc:  # noqa: BLE001 - an unreachable server: no sampler
                print(f"[mlflow] system metrics off for this attempt: {one_line(exc)}",
                      file=sys.stderr, flush=True)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.writer.set_tag(key, value)

    def log(self, metrics: dict[str, float], step: int, *, epoch: int, stage: str) -> None:
        if self.rank != 0 or step % self.every:
            return
        eta = ""
        if self.total_steps:
            rate = (time.time() - self.started) / max(step, 1)
            eta = f" eta {max(0, self.total_steps - step) * rate / 60:.1f} min"
        print(f"[train] step {step}{f'/{self.total_steps}' if self.total_steps else ''} "
              f"epoch {epoch} {stage} loss {metrics.get('loss/total', float('nan')):.4f} "
              f"{metrics.get('train/samples_per_s', 0):.1f} samples/s{eta}", flush=True)
        self.log_now(metrics, step)

    def log_now(self, metrics: dict[str, float], step: int) -> None:
        """Log regardless of the logging interval (rank 0 only)."""
        if self.enabled:
            self.writer.log_metrics(metrics, step)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact of the run (rank 0 only)."""
        if self.enabled:
            self.writer.log_text(text, artifact_file)

    def finish(self, module, state_dict, step: int) -> dict[str, float]:
        """Export the final weights (``from_pretrained`` directory), log them, end the run, and
        wait (``mlflow.final_sync_seconds``) for anything kept during an outage. Returns the
        writer's summary (``mlflow/*``: outage seconds, delayed/undelivered values)."""
        from dinor1 import storage

        remote = self.final_dir if self.final_dir and storage.is_uri(self.final_dir) else None
        target = Path(self.final_dir) if self.final_dir and not remote else Path(tempfile.mkdtemp())
        module.save_pretrained(target, state_dict)
        if remote:  # an object-store run folder: export there too
            storage.upload_dir(target, remote)
        print(f"[train] final weights: {remote or target}", file=sys.stderr, flush=True)
        if not self.enabled:
            return {}
        import mlflow

        if self.system_metrics:
            try:
                mlflow.end_run()  # stops the sampler (and marks the run finished)
            except Exception as exc:  # noqa: BLE001
                print(f"[mlflow] {one_line(exc)}", file=sys.stderr, flush=True)
        self.writer.log_artifacts(str(target), "final_model")
        self.writer.end_run()
        summary = self.writer.close(self.sync_seconds)
        if summary["mlflow/outage_seconds"] and not summary["mlflow/undelivered_values"]:
            self.writer.log_metrics(summary, step)  # the outage healed: say so in the run
            self.writer.close(self.sync_seconds)  # (reports it, should the server go again)
        return summary
