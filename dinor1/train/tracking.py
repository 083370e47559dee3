"""MLflow tracking from rank 0 inside the training function.

The driver creates the experiment (with an explicit artifact location) and the run, and passes
the run id to the workers, so a restarted worker group keeps logging into the SAME run. Writes
go through :class:`~dinor1.train.mlflow_writer.MlflowWriter` (queued, spooled, delivered by a
background thread); the console line is :class:`~dinor1.train.progress.ProgressLine`.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from dinor1.train.mlflow_writer import MlflowWriter, one_line, read_spool, spool_files
from dinor1.train.progress import ProgressLine

if TYPE_CHECKING:
    from dinor1.train.settings import WorkerSettings


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

    Writes go through an :class:`MlflowWriter`: they are queued and sent by its background
    thread, so a tracking server that is down, or up but not answering, never holds up the
    training loop. At start it first queues spool files an earlier attempt of the same run left
    behind. MLflow's system-metrics sampler (CPU, memory, GPU; its own thread and requests) is
    also started and stopped on helper threads: nothing here waits on the server.
    """

    def __init__(self, settings: WorkerSettings, rank: int, world: int):
        self.enabled = rank == 0 and settings.mlflow_run_id is not None
        self.rank = rank
        self.every = settings.train.mlflow.log_every_steps
        self.sync_seconds = settings.train.mlflow.final_sync_seconds
        self.progress = ProgressLine(
            str(settings.run_folder).rstrip("/").rsplit("/", 1)[-1] or "train",
            settings.total_steps, every_steps=self.every)
        self.run_id = settings.mlflow_run_id
        self.sampler = None  # MLflow's SystemMetricsMonitor, once started
        self.sampler_lock = threading.Lock()
        self.finished = False
        if self.enabled:
            import mlflow

            # fail fast into the writer's own retries rather than MLflow's (minutes of backoff)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            uri = settings.tracking_uri
            mlflow.set_tracking_uri(uri)
            spool_dir = settings.mlflow_spool_dir
            self.writer = MlflowWriter(mlflow.MlflowClient(uri), self.run_id,
                                       Path(spool_dir) if spool_dir else None, tracking_uri=uri)
            if spool_dir and Path(spool_dir).is_dir():
                for path in spool_files(Path(spool_dir), self.run_id):  # a killed attempt's
                    _, records = read_spool(path)
                    self.writer.write(records)  # (now in this writer's own spool file)
                    path.unlink()
            self.writer.set_tag("world_size", str(world))
            threading.Thread(target=self._start_sampler, args=(uri,),
                             name="mlflow-sampler-start", daemon=True).start()

    def _start_sampler(self, tracking_uri: str) -> None:
        # (resuming the sampler's step count reads the run from the server: not on our thread)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            sampler = SystemMetricsMonitor(self.run_id, resume_logging=True,
                                           tracking_uri=tracking_uri)
            with self.sampler_lock:
                if not self.finished:
                    sampler.start()
                    self.sampler = sampler
        except Exception as exc:  # noqa: BLE001 - no sampler, training goes on
            print(f"[mlflow] system metrics off for this attempt: {one_line(exc)}",
                  file=sys.stderr, flush=True)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.writer.set_tag(key, value)

    def log(self, metrics: dict[str, float], step: int, *, epoch: int, stage: str) -> None:
        """One step's metrics: to MLflow every ``mlflow.log_every_steps`` steps, and the
        progress line when it is due (rank 0 only)."""
        if self.rank != 0:
            return
        self.progress.step(metrics, step, epoch=epoch, stage=stage)
        if step % self.every == 0:
            self.log_now(metrics, step)

    def log_now(self, metrics: dict[str, float], step: int) -> None:
        """Log regardless of the logging interval (rank 0 only)."""
        if self.enabled:
            self.writer.log_metrics(metrics, step)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact of the run (rank 0 only)."""
        if self.enabled:
            self.writer.log_text(text, artifact_file)

    def finish(self, final_model: Path, step: int) -> dict[str, float]:
        """Log the exported final model (``checkpoints.export_final_model``), end the run, and
        wait (``mlflow.final_sync_seconds``) for everything still queued. Returns the writer's
        summary (``mlflow/*``: outage seconds, delayed/undelivered values)."""
        if not self.enabled:
            return {}
        with self.sampler_lock:
            self.finished = True
            sampler = self.sampler
        if sampler is not None:  # (its last request may hang: not on this thread)
            threading.Thread(target=sampler.finish, name="mlflow-sampler-stop",
                             daemon=True).start()
        self.writer.log_artifacts(str(final_model), "final_model")
        self.writer.end_run()
        summary = self.writer.close(self.sync_seconds)
        if summary["mlflow/outage_seconds"] and not summary["mlflow/undelivered_values"]:
            self.writer.log_metrics(summary, step)  # the outage healed: say so in the run
            self.writer.close(self.sync_seconds)  # (reports it, should the server go again)
        return summary
