"""Rank 0's progress line on the console: step, loss, samples/s and ETA, about ten lines a
run when quiet (``dinor1/console.py``), every ``mlflow.log_every_steps`` steps with
``--verbose``."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """Rank 0's console line: step/total (percent), epoch, stage, loss, samples/s (averaged
    since the previous line), ETA.

    Quiet (the default), a line is printed at the first step of an attempt, then when a tenth
    of the run's estimated time has passed since the last one (at least ``MIN_SECONDS``, at
    most ``MAX_SECONDS``: about ten lines for a short run, one a minute for a long one), and at
    the last step (a line due less than half an interval before it waits for it). With
    ``--verbose``: every ``every_steps`` steps (``mlflow.log_every_steps``). The ETA counts from
    the first step of this attempt (not the setup before it). The line is written to the
    worker's stdout itself, so that Ray Train's print patch cannot print it twice
    (``dinor1/console.py``).
    """

    MIN_SECONDS = 10.0
    MAX_SECONDS = 60.0

    def __init__(self, name: str, total_steps: int | None, *, every_steps: int = 10,
                 verbose: bool | None = None, clock=time.monotonic, out=None):
        from dinor1.console import is_verbose

        self.name, self.total, self.every = name, total_steps, max(1, every_steps)
        self.verbose = is_verbose() if verbose is None else verbose
        self.clock, self.out = clock, out
        self.first: tuple[int, float] | None = None  # (step, time) of this attempt's first step
        self.last: tuple[int, float] | None = None  # of the last line printed

    def due(self, step: int, now: float) -> bool:
        if self.first is None or step == self.total:
            return True
        if self.verbose:
            return step % self.every == 0
        (first_step, first_time), interval = self.first, self.MAX_SECONDS
        if self.total and step > first_step:
            per_step = (now - first_time) / (step - first_step)
            interval = min(self.MAX_SECONDS, max(self.MIN_SECONDS,
                                                 per_step * (self.total - first_step) / 10))
            if per_step * (self.total - step) < interval / 2:
                return False  # the last step's line comes soon
        return now - self.last[1] >= interval

    def step(self, metrics: dict[str, float], step: int, *, epoch: int, stage: str) -> None:
        now = self.clock()
        if not self.due(step, now):
            return
        if self.first is None:
            self.first = self.last = (step, now)
        self.write(self.format(metrics, step, epoch=epoch, stage=stage, now=now))
        self.last = (step, now)

    def format(self, metrics: dict[str, float], step: int, *, epoch: int, stage: str,
               now: float) -> str:
        total = f"/{self.total} ({100 * step / self.total:.0f}%)" if self.total else ""
        (first_step, first_time), (last_step, last_time) = self.first, self.last
        rate = ""  # (none at the first step: it waited for the first batch)
        if step > last_step and now > last_time:
            per_step = metrics.get("train/samples_per_s", 0.0) * metrics.get(
                "train/step_seconds", 0.0)  # samples in a step, all workers
            samples_per_s = (per_step * (step - last_step) / (now - last_time) if per_step
                             else metrics.get("train/samples_per_s", 0.0))
            rate = f" {samples_per_s:.1f} samples/s"
            if self.total:
                left = max(0, self.total - step) * (now - first_time) / (step - first_step)
                rate += f" eta {left / 60:.1f} min"
        return (f"[train {self.name}] step {step}{total} epoch {epoch} {stage} "
                f"loss {metrics.get('loss/total', float('nan')):.4f}{rate}")

    def write(self, line: str) -> None:
        out = self.out or sys.stdout
        out.write(line + "\n")
        out.flush()
