"""What keeps one bad step from breaking a run, and the drills that rehearse it.

A step is skipped, on every worker together, when any worker's batch is empty (all its samples
were corrupt), when the loss is NaN/inf on any worker, or when the gradients are (ZeRO-0 checks
them here; ZeRO-1/2/3 skip such a step themselves). Too many non-finite steps in a row stop the
run (``faults.max_consecutive_nonfinite``). The drills (``faults.inject_*``) poison the forward,
the loss or the gradients of chosen batches on rank 0, so the tests exercise the real paths.
"""

from __future__ import annotations

import contextlib

import torch

from dinor1.config import FaultsSection


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradients
    (``faults.max_consecutive_nonfinite``)."""


def any_empty(batch) -> bool:
    """Whether any worker's batch has no usable image (one all-reduce). The forward holds
    collectives (the box-count average; ZeRO-3's parameter gathers), so a worker may skip it
    only when every worker does."""
    empty = torch.tensor([float(len(batch["image_ids"]) == 0)],
                         device=batch["pixel_values"].device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(empty, op=torch.distributed.ReduceOp.MAX)
    return empty.item() > 0


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on EVERY worker (one all-reduce), so all skip alike."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0],
                       device=loss.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def gradients_finite(engine, zero_stage: int) -> bool:
    """Before ``engine.step()``: whether this step's gradients are finite. ZeRO-1/2/3 check this
    themselves (across ranks) and skip the step, so only ZeRO-0 is checked here, on the already
    all-reduced (hence identical on every rank) gradients. A bad ZeRO-0 step has its gradients
    dropped (the caller then skips ``engine.step()``), so every weight stays as it was."""
    if zero_stage > 0:
        return True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all()):
        return True
    for p in engine.module.parameters():
        p.grad = None
    return False


class NonFiniteStreak:
    """Counts consecutive non-finite steps; raises past ``faults.max_consecutive_nonfinite``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.length = 0

    def good(self) -> None:
        self.length = 0

    def bad(self) -> int:
        """One more bad step; returns how many in a row."""
        self.length += 1
        return self.length

    def check(self, step: int, saved_step: int) -> None:
        """Raise when the streak reached the limit (``step``: the last good step)."""
        if self.length >= self.limit:
            raise NonFiniteLossError(
                f"{self.length} consecutive non-finite losses or gradients after step {step} "
                f"(faults.max_consecutive_nonfinite={self.limit}); the last good checkpoint is "
                f"the newest one in the run folder (step {saved_step})")


class _PoisonGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients (fault drills)."""

    @staticmethod
    def forward(ctx, loss):
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@contextlib.contextmanager
def _nan_logits(model):
    """Every prompt logit of the forward NaN (a non-finite FORWARD, which the Hungarian
    matching sees before any loss exists)."""
    handle = model.prompt_classifier.register_forward_hook(
        lambda module, args, output: output * float("nan"))
    try:
        yield
    finally:
        handle.remove()


class FaultDrill:
    """Rehearsed faults on rank 0, by the 1-based count of batches this attempt has run
    forward (``faults.inject_nonfinite_logits_batches`` / ``_batches`` / ``_grad_batches``)."""

    def __init__(self, faults: FaultsSection, rank: int):
        self.faults = faults
        self.armed = rank == 0
        self.batches_seen = 0

    def forward(self, model):
        """Context for the next forward: NaN logits when that batch is drilled."""
        if self.armed and self.batches_seen + 1 in self.faults.inject_nonfinite_logits_batches:
            return _nan_logits(model)
        return contextlib.nullcontext()

    def after_forward(self, loss: torch.Tensor) -> torch.Tensor:
        """Count the batch; its loss made NaN, or its gradients, when drilled."""
        self.batches_seen += 1
        if self.armed:
            if self.batches_seen in self.faults.inject_nonfinite_batches:
                loss = loss * float("nan")
            if self.batches_seen in self.faults.inject_nonfinite_grad_batches:
                loss = _PoisonGradient.apply(loss)
        return loss
