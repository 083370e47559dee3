"""The model inside a training wrapper: a DeepSpeed engine around ``TrainingObjective``
around ``DinoR1``. Whatever holds the model, these find it and read its full weights."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def unwrap(policy: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine and/or a training wrapper (or the model itself)."""
    module = getattr(policy, "module", policy)
    return getattr(module, "net", module)


def full_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """A complete CPU copy of the model's weights, gathering ZeRO-3 partitions if needed
    (collective under ZeRO-3: every rank must call it)."""
    module = unwrap(policy)
    params = list(module.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned parameters
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
