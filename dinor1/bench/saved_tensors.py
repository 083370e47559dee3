"""Bytes autograd keeps for the backward pass: a device-independent measure of a step's
activation memory (the same count on CPU, CUDA or fake tensors)."""

from __future__ import annotations

import torch


class SavedTensors:
    """Sum of the distinct storages autograd saves for backward (parameters excluded).

    Use as ``with saved.hooks(): loss = step()``; ``saved.total`` is then the bytes held for the
    backward (each storage counted once, however many tensors view it).
    """

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.params and key not in self.seen:
            self.seen[key] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
