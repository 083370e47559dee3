"""Optimiser parameter groups, the learning-rate schedule and the generated DeepSpeed config."""

from __future__ import annotations

import torch
from torch import nn

from dinor1.config import TrainConfig

# parameters trained at lr x backbone_lr_mult (Grounding DINO's recipe: image and text encoders)
_BACKBONE_PREFIXES = ("gdino.model.backbone.", "gdino.model.text_backbone.")
_NO_DECAY_HINTS = ("norm", "bias", "level_embed", "position_embeddings", "position_embedding",
                   "query_position_embeddings", "content.weight")


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: backbone/text encoder at a lower lr; no weight decay on norms, biases and
    position embeddings."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.startswith(_BACKBONE_PREFIXES)
        no_decay = param.ndim <= 1 or any(h in name for h in _NO_DECAY_HINTS)
        groups.setdefault((backbone, no_decay), []).append(param)
    opt = cfg.optimizer
    return [
        {"params": params, "lr": opt.lr * (opt.backbone_lr_mult if backbone else 1.0),
         "weight_decay": 0.0 if no_decay else opt.weight_decay,
         "name": f"{'backbone' if backbone else 'head'}{'_no_decay' if no_decay else ''}"}
        for (backbone, no_decay), params in sorted(groups.items())
    ]


def lr_factor(step: int, epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, then x ``gamma`` at each
    epoch in ``decay_epochs`` (docs/method.md section 3)."""
    sched = cfg.schedule
    factor = sched.gamma ** sum(epoch >= e for e in sched.decay_epochs)
    if step < sched.warmup_steps:
        factor *= sched.warmup_factor + (1 - sched.warmup_factor) * step / sched.warmup_steps
    return factor


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


def deepspeed_config(cfg: TrainConfig) -> dict:
    """DeepSpeed's JSON config generated from ours (the optimiser is passed in as torch AdamW,
    which also avoids DeepSpeed's JIT-compiled FusedAdam)."""
    ds = cfg.deepspeed
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.bucket_elements:
        zero = out["zero_optimization"]
        zero["reduce_bucket_size"] = ds.bucket_elements
        if ds.zero_stage in (1, 2):
            zero["allgather_bucket_size"] = ds.bucket_elements
    if ds.precision == "bf16":
        # mixed precision the PyTorch-AMP way: fp32 weights and optimiser, forward under
        # torch.autocast(bfloat16) inside the engine (DeepSpeed's bf16 mode would cast the
        # weights and leave our fp32 inputs and CDN queries unconverted)
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if not ds.bf16_gradient_reduce:
            # no module's gradients marked "safe in bf16": every gradient is reduced in fp32
            out["torch_autocast"]["lower_precision_safe_modules"] = []
    elif ds.precision == "fp16":
        out["fp16"] = {"enabled": True}
    return out
