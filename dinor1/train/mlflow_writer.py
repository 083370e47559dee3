"""MLflow writes that never hold up training: :class:`MlflowWriter` queues them (and appends
them to a spool file) and a background thread delivers them in order, so a tracking server that
is down, or accepts connections and never answers, does not slow the training loop, and what was
logged meanwhile is delivered when the server answers again (or named at the end for
``dinor1 mlflow sync``, :func:`sync_spool`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

SPOOL_SUFFIX = ".mlflow-spool.jsonl"
MAX_RECORDS_PER_CALL = 1000  # MLflow's log_batch limit for metrics
MAX_KEPT_IN_MEMORY = 100_000  # records queued in memory; later ones wait in the spool file only


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
    on a background thread, so the caller (the training thread) never waits on the tracking
    server: a write only appends its records to the spool file and to an in-memory queue.

    The sender thread takes up to ``MAX_RECORDS_PER_CALL`` queued records at a time and
    delivers them (:func:`deliver`). When that fails for a reason that may pass (connection
    refused, a request that times out after ``MLFLOW_HTTP_REQUEST_TIMEOUT`` s because the server
    accepts but never answers, a 5xx, a locked sqlite file), an outage begins: it is announced
    on stderr and the same records are retried with backoff (1 s doubling up to
    ``max_backoff``) while writes keep queueing. When the queue is empty again the outage ends
    and is recorded (``mlflow/outage_seconds``, ``mlflow/delayed_values``: records delivered
    while it lasted). When MLflow rejects a batch (a 4xx), its records are sent again one at a
    time; each one rejected is reported on stderr and counted, never retried.

    The spool file (JSON lines, a header with the run id and tracking URI, then records) is
    written by the caller, before the records are queued: it is created by the first write
    after the queue was empty and deleted when the queue is empty again, so it holds everything
    not yet delivered, in order (after the records delivered since it was created), and a
    process killed at any moment loses nothing. Spool files left by a killed process are
    delivered by the next writer of the same run, or by ``dinor1 mlflow sync``; delivering a
    record twice is harmless (MLflow ignores an identical metric, tags and artifacts
    overwrite).

    Memory is bounded: about ``MAX_KEPT_IN_MEMORY`` records are queued in memory; later ones
    are only appended to the spool file and read back from it, in order, once the memory queue
    has drained. Without a spool folder those later records are dropped (and counted as
    undelivered).
    """

    def __init__(self, client, run_id: str, spool_dir: Path | None, *, tracking_uri: str = "",
                 max_backoff: float = 30.0):
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.spool: Path | None = None
        self.pending: list[dict] = []  # queued in memory, oldest first
        self.spool_only = 0  # records after ``pending`` that are only in the spool file
        self.spool_done = 0  # records at the head of the spool file that are already handled
        self.dropped = 0  # over the memory bound with no spool file: lost
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # records queued / the queue emptied
        self.wake = threading.Event()  # cuts a backoff wait short
        self.thread: threading.Thread | None = None
        self.stop: threading.Event | None = None  # the running sender's own stop signal
        self.closed = False  # close() gave up on records: they stay in the spool, no more sending
        self.max_backoff = max_backoff
        self.outage_since: float | None = None
        self.outage_seconds = 0.0
        self.delayed = 0  # records delivered during an outage
        self.rejected_count = 0
        self.last_error = ""

    # -- writes (the caller's thread: no network I/O) --------------------------------------
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
        """Queue ``records`` for delivery (after everything queued before); returns at once."""
        if not records:
            return
        with self.lock:
            self._append_to_spool(records)
            if self.spool_only or len(self.pending) >= MAX_KEPT_IN_MEMORY:
                if self.spool is not None:
                    self.spool_only += len(records)
                else:
                    if not self.dropped:
                        print(f"[mlflow] over {MAX_KEPT_IN_MEMORY} records waiting and no spool "
                              "folder: later records are dropped", file=sys.stderr, flush=True)
                    self.dropped += len(records)
            else:
                self.pending.extend(records)
            if not self.closed:
                self._start_sender()
                self.changed.notify_all()

    def _append_to_spool(self, records: list[dict]) -> None:
        if self.spool_dir is None:
            return
        if self.spool is None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self.spool = self.spool_dir / (
                f"{self.run_id}-{os.getpid()}-{time.time_ns()}{SPOOL_SUFFIX}")
            self.spool_done = 0
            with self.spool.open("w") as f:
                f.write(json.dumps({"kind": "run", "run_id": self.run_id,
                                    "tracking_uri": self.tracking_uri}) + "\n")
        with self.spool.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    # -- the sender thread -----------------------------------------------------------------
    def _start_sender(self) -> None:
        if self.thread is not None and self.thread.is_alive() and not self.stop.is_set():
            return
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._send, args=(self.stop,), name="mlflow-writer",
                                       daemon=True)
        self.thread.start()

    def _send(self, stop: threading.Event) -> None:
        backoff = 1.0
        one_by_one = 0  # after a rejected batch: its records alone, to reject only the bad ones
        while True:
            with self.lock:
                while not (self.pending or self.spool_only) and not stop.is_set():
                    self.changed.wait()
                if stop.is_set():
                    return
                batch = self.pending[:1 if one_by_one else MAX_RECORDS_PER_CALL]
                reload = (self.spool, self.spool_done, min(self.spool_only, MAX_KEPT_IN_MEMORY))
            if not batch:  # the memory queue drained: read the next records back from the spool
                spool, start, count = reload
                records = read_spool(spool)[1][start:start + count]
                with self.lock:
                    self.pending.extend(records)
                    self.spool_only -= count
                continue
            attempt = time.monotonic()
            try:
                deliver(self.client, self.run_id, batch)
            except Exception as exc:  # noqa: BLE001 - MLflow/requests/sqlite raise many types
                if rejected(exc) and len(batch) > 1:
                    one_by_one = len(batch)
                    continue
                if rejected(exc):
                    self._report_rejected(batch, exc)
                else:
                    self._outage(exc, attempt)
                    self.wake.wait(backoff)
                    self.wake.clear()
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
            else:
                if self.outage_since is not None:
                    self.delayed += len(batch)
            backoff = 1.0
            one_by_one = max(0, one_by_one - len(batch))
            with self.lock:
                if stop.is_set():  # close() gave up meanwhile: the spool file keeps it all
                    return
                del self.pending[:len(batch)]
                self.spool_done += len(batch)
                if not (self.pending or self.spool_only):
                    self._all_delivered()

    def _outage(self, exc: BaseException, since: float) -> None:
        self.last_error = one_line(exc)
        if self.outage_since is None:
            self.outage_since = since  # (a request that timed out: since it was sent)
            print(f"[mlflow] tracking server unreachable ({self.last_error}); training goes on, "
                  "metrics are kept and will be sent when it is back", file=sys.stderr,
                  flush=True)

    def _all_delivered(self) -> None:
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)
            self.spool = None
        if self.outage_since is not None:
            seconds = time.monotonic() - self.outage_since
            self.outage_seconds += seconds
            self.outage_since = None
            print(f"[mlflow] tracking server back after {seconds:.0f} s; {self.delayed} "
                  "kept records delivered so far", file=sys.stderr, flush=True)
        self.changed.notify_all()

    def _report_rejected(self, records: list[dict], exc: BaseException) -> None:
        self.rejected_count += len(records)
        print(f"[mlflow] the server rejected {len(records)} record(s) "
              f"({', '.join(sorted({r.get('key', r['kind']) for r in records})[:5])}): "
              f"{one_line(exc)}", file=sys.stderr, flush=True)

    # -- the end ---------------------------------------------------------------------------
    def waiting(self) -> int:
        """Records written but not delivered (nor rejected) yet."""
        return len(self.pending) + self.spool_only + self.dropped

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for everything written to be delivered (retrying at least
        every second meanwhile); returns how many records are still waiting."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while (self.pending or self.spool_only) and self.thread is not None \
                    and self.thread.is_alive() and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wake.set()
                self.changed.wait(min(1.0, left))
            return self.waiting()

    def close(self, timeout: float) -> dict[str, float]:
        """Wait up to ``timeout`` s for pending writes and stop the sender; report what happened.
        What was not delivered by then stays in the spool file (named on stderr) and is no longer
        sent here. Returns within ``timeout`` plus one request timeout (a request in flight)."""
        left = self.flush(timeout)
        with self.lock:
            self.closed = self.closed or left > 0
            thread, stop = self.thread, self.stop
            if stop is not None:
                stop.set()
            self.wake.set()
            self.changed.notify_all()
        if thread is not None:
            thread.join(float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")) + 1.0)
        with self.lock:
            left = self.waiting()
            steps = [r["step"] for r in self.pending if r["kind"] == "metric"]
        summary = {"mlflow/outage_seconds": self.outage_seconds,
                   "mlflow/delayed_values": float(self.delayed),
                   "mlflow/rejected_values": float(self.rejected_count),
                   "mlflow/undelivered_values": float(left)}
        if left:
            span = f" (steps {min(steps)}-{max(steps)})" if steps else ""
            kept = (f"they are kept in {self.spool}; send them with: dinor1 mlflow sync "
                    f"{self.spool}" if self.spool else "no spool folder: they are lost")
            print(f"[mlflow] tracking server still unreachable at the end "
                  f"({self.last_error or 'no answer yet'}): {left} records{span} were not "
                  f"delivered; {kept}", file=sys.stderr, flush=True)
        return summary
