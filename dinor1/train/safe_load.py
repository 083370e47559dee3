"""DeepSpeed checkpoints read without unpickling code.

DeepSpeed's own checkpoint engine reads its ``.pt`` files with ``torch.load(weights_only=False)``,
which runs whatever a pickled object asks for: resuming or branching (``checkpointing.start_from``)
from a checkpoint folder someone else wrote would run their code. This engine reads the same
files with ``weights_only=True``; the few DeepSpeed classes its checkpoints hold (plain state
holders) are allowlisted by name. A checkpoint that needs anything else fails to load with
PyTorch's message naming the global, instead of running it.
"""

from __future__ import annotations

import importlib

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

# what DeepSpeed 0.19 ZeRO 0-3 checkpoints of this project contain besides tensors and builtins
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def safe_globals() -> list:
    out = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # a DeepSpeed version without it
            pass
    return out


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loading(engine) -> None:
    """Swap a DeepSpeed engine's default checkpoint engine for :class:`WeightsOnlyCheckpointEngine`
    (saving is unchanged)."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
