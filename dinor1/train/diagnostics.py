"""What a run reports about itself besides the losses: checksums of what a checkpoint holds,
each worker's memory, and where a step's time goes (waiting for data or computing)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from dinor1.model.wrapped import full_state_dict


def tensor_checksum(obj) -> float:
    """float64 sum of every floating-point tensor inside nested dicts/lists (e.g. an optimiser
    state dict), for checking that a restore brought back what was saved."""
    if isinstance(obj, torch.Tensor):
        return float(obj.detach().double().sum()) if obj.is_floating_point() else 0.0
    if isinstance(obj, dict):
        return sum(tensor_checksum(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_checksum(v) for v in obj)
    return 0.0


def weight_checksum(state_dict: dict[str, torch.Tensor]) -> float:
    """Sum of every floating-point weight in float64: equal weights give equal checksums."""
    return tensor_checksum(state_dict)


def state_checksums(engine, reference) -> dict[str, float]:
    """Weights (gathered: collective under ZeRO-3), this rank's optimiser state, the AdamW
    moments of all ranks (collective), reference."""
    state = engine.optimizer.state_dict()
    sums = {"weights": weight_checksum(full_state_dict(engine)),
            "optimizer": tensor_checksum(state),
            "moments": all_moments_checksum(state, engine.device)}
    if reference is not None:
        sums["reference"] = weight_checksum(reference.model.state_dict())
    return sums


def all_moments_checksum(state: dict, device) -> float:
    """Sum of every AdamW moment (exp_avg, exp_avg_sq) over all ranks' partitions: the same
    for the same optimiser state whatever the number of workers holding it (the partitions'
    padding is zeros), so a resized run's restore can be checked against what was saved.
    Collective when torch.distributed is initialised."""
    import torch.distributed as dist

    moments = state.get("base_optimizer_state", state.get("optimizer_state_dict", state))
    per_param = moments.get("state", {}) if isinstance(moments, dict) else {}
    if isinstance(per_param, list):  # ZeRO-1/2 keep one state dict per parameter group
        per_param = {i: s for group in per_param for i, s in group.items()}
    total = sum(tensor_checksum(v) for entry in per_param.values() if isinstance(entry, dict)
                for k, v in entry.items() if k in ("exp_avg", "exp_avg_sq"))
    value = torch.tensor([total], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
    return float(value.item())


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts/lists (e.g. an optimiser state dict)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def memory_use(engine) -> dict[str, float]:
    """This worker's peak memory (process RSS; CUDA allocator peak on a GPU), the optimiser
    state it holds (its ZeRO partition: shrinks ~1/N with ZeRO-1/2/3) and its torch threads."""
    import resource

    state = engine.optimizer.state_dict()
    # the AdamW moments (ZeRO-1/2: "base_optimizer_state", ZeRO-3: "optimizer_state_dict");
    # the rest of a ZeRO state is its fp32 master partition
    moments = state.get("base_optimizer_state", state.get("optimizer_state_dict", state))
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "optimizer_state_mb": tensor_bytes(state) / 2**20,
           "adam_moments_mb": tensor_bytes(moments) / 2**20,
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class StepTimer:
    """Where one epoch's step time goes: waiting for the next batch or computing with it.

    Wrap the epoch's batches with :meth:`timed`; call :meth:`step_metrics` once a step is done.
    A batch that is skipped (no step) counts toward neither.
    """

    def __init__(self) -> None:
        self.waited = self.computed = 0.0
        self.first_wait: float | None = None  # Ray Data starting this epoch's execution
        self._asked = self._arrived = 0.0

    def timed(self, batches: Iterable) -> Iterator:
        self._asked = time.perf_counter()
        for batch in batches:
            self._arrived = time.perf_counter()
            yield batch
            self._asked = time.perf_counter()

    def step_metrics(self, images: int) -> dict[str, float]:
        """``train/*`` timing of the step just done (``images``: across all workers)."""
        done = time.perf_counter()
        wait, compute = self._arrived - self._asked, done - self._arrived
        self.waited += wait
        self.computed += compute
        if self.first_wait is None:
            self.first_wait = wait
        steady = self.waited - self.first_wait
        return {
            "train/samples_per_s": images / (done - self._asked),
            "train/step_seconds": done - self._asked,
            "train/compute_seconds": compute,
            "train/data_wait_fraction": self.waited / max(self.waited + self.computed, 1e-9),
            # the same without the epoch's first batch (a fixed cost per epoch, ~0.4 s here: Ray
            # Data starts a new execution; it weighs little in long epochs)
            "train/data_wait_fraction_steady": steady / max(steady + self.computed, 1e-9),
            "train/epoch_start_wait_seconds": self.first_wait,
        }
