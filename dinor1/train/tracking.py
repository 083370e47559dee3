"""MLflow tracking from rank 0 inside the training function, and the progress line.

The driver creates the experiment (with an explicit artifact location) and the run, and passes
the run id to the workers, so a restarted worker group keeps logging into the SAME run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


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
    """Logs metrics and prints progress on rank 0; does nothing on other ranks."""

    def __init__(self, config: dict, rank: int, world: int):
        self.enabled = rank == 0 and config.get("mlflow_run_id") is not None
        self.rank = rank
        self.every = config["train"]["mlflow"]["log_every_steps"]
        self.total_steps = config.get("total_steps")
        self.started = time.time()
        self.run_id = config.get("mlflow_run_id")
        self.final_dir = config.get("final_model_dir")
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(config["tracking_uri"])
            self.client = mlflow.MlflowClient(config["tracking_uri"])
            self.client.set_tag(self.run_id, "world_size", str(world))
            # the fluent run only drives MLflow's system-metrics sampler (CPU, memory, GPU)
            mlflow.start_run(run_id=self.run_id, log_system_metrics=True)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

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
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[
                Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, module, state_dict) -> None:
        """Export the final weights (``from_pretrained`` directory) and log them."""
        from dinor1 import storage

        remote = self.final_dir if self.final_dir and storage.is_uri(self.final_dir) else None
        target = Path(self.final_dir) if self.final_dir and not remote else Path(tempfile.mkdtemp())
        module.save_pretrained(target, state_dict)
        if remote:  # an object-store run folder: export there too
            storage.upload_dir(target, remote)
        print(f"[train] final weights: {remote or target}", file=sys.stderr, flush=True)
        if self.enabled:
            import mlflow

            self.client.log_artifacts(self.run_id, str(target), "final_model")
            mlflow.end_run()
