"""The model each worker trains and the DeepSpeed engine around it.

The engine wraps ``TrainingObjective`` (model + objective as one module, so one forward call
covers the whole step and ZeRO-3 gathers what the step reads), with AdamW over the parameter
groups of ``train/optim.py`` and the DeepSpeed config generated there.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from dinor1.config import TrainConfig


def build_model(cfg: TrainConfig):
    """The DinoR1 a run starts from (``model.init``: a preset, a dinor1 or HF directory)."""
    from dinor1.model.dino_r1 import DinoR1, DinoR1Settings
    from dinor1.model.presets import PRESETS, preset_config

    settings = DinoR1Settings(num_dn_queries=cfg.model.num_dn_queries)
    ffn = cfg.model.prompt_encoder_ffn_dim
    if ffn is None and cfg.model.init in PRESETS:
        ffn = preset_config(cfg.model.init).encoder_ffn_dim
    if ffn is not None:
        settings.prompt_encoder_ffn_dim = ffn
    model = DinoR1.from_pretrained(cfg.model.init, settings)
    if cfg.model.freeze_text_encoder:
        model.gdino.model.text_backbone.requires_grad_(False)
    if cfg.model.channels_last:
        from dinor1.model.compile import use_channels_last

        use_channels_last(model)
    if cfg.model.compile:
        from dinor1.model.compile import compile_hot_modules

        compile_hot_modules(model, backend=cfg.model.compile_backend,
                            mode=cfg.model.compile_mode)
    return model


def class_text(cfg: TrainConfig, model, class_names: dict[str, str] | None):
    """{category id: frozen text embedding of its name} for the contrastive loss, or None (see
    ``launch.contrastive_class_names``). Computed once, before the engine partitions weights."""
    if not class_names:
        return None
    from dinor1.model.text import class_text_embeddings, load_tokenizer

    names = {int(k): v for k, v in class_names.items()}
    tokenizer = load_tokenizer(cfg.model.init, model.config.text_config.vocab_size,
                               list(names.values()))
    was_training = model.training
    embeddings = class_text_embeddings(model.eval(), tokenizer, names)
    model.train(was_training)
    return embeddings


def engine_device_args(cfg: TrainConfig):
    """DeepSpeed's ``args`` naming the worker's own GPU (``device_rank``), or None on CPU.

    Left alone, DeepSpeed puts its engine on ``cuda:LOCAL_RANK`` while Ray Train moves the
    batches to ``ray.train.torch.get_device()``; the two agree only as long as Ray's device order
    matches the local ranks. Naming the device makes them one by construction."""
    if not (cfg.scaling.use_gpu and torch.cuda.is_available()):
        return None
    import argparse

    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return argparse.Namespace(device_rank=device.index)


@dataclass
class TrainingEngine:
    """A worker's DeepSpeed engine, its optimiser, and the base learning rate of each group."""

    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]

    @property
    def model(self):
        """The DinoR1 inside the engine."""
        from dinor1.model.wrapped import unwrap

        return unwrap(self.engine)


@contextlib.contextmanager
def _no_compile_decorators():
    """``torch.compile`` decorators made plain for a while (``TORCHDYNAMO_DISABLE=1``, which
    torch reads when it decorates). For ``deepspeed.initialize``: its ZeRO optimizer check imports
    DeepSpeed's Muon optimizer, whose module-level ``torch.compile`` decorators import torch's
    inductor, ~2 CPU-seconds in every worker of every run; dinor1 never uses Muon. The model's own
    ``model.compile`` is applied before (:func:`build_model`) and is not affected."""
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def build_engine(cfg: TrainConfig, class_names: dict[str, str] | None) -> TrainingEngine:
    """Model + objective + AdamW inside a DeepSpeed engine, ready to resume or train."""
    from dinor1.console import quiet_deepspeed, quiet_train_worker

    quiet_train_worker()  # (the first thing a worker does, before DeepSpeed is imported)
    import deepspeed

    quiet_deepspeed()
    from dinor1.objectives.step import TrainingObjective
    from dinor1.train.optim import deepspeed_config, parameter_groups
    from dinor1.train.safe_load import use_weights_only_loading

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a slow JIT build
    model = build_model(cfg)
    wrapped = TrainingObjective(model, class_text(cfg, model, class_names))
    groups = parameter_groups(model, cfg)
    if wrapped.contrastive is not None:  # its learnable temperature
        groups.append({"params": list(wrapped.contrastive.parameters()), "lr": cfg.optimizer.lr,
                       "weight_decay": 0.0, "name": "contrastive"})
    optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas)
    with _no_compile_decorators():
        engine, optimizer, _, _ = deepspeed.initialize(args=engine_device_args(cfg), model=wrapped,
                                                       optimizer=optimizer,
                                                       config=deepspeed_config(cfg))
    if wrapped.class_text is not None:  # (a plain dict: the engine did not move it)
        wrapped.class_text = {k: v.to(engine.device) for k, v in wrapped.class_text.items()}
    use_weights_only_loading(engine)  # resuming never unpickles code
    if cfg.deepspeed.zero_stage == 3:
        wrapped.register_for_zero3()
    return TrainingEngine(engine, optimizer, [g["lr"] for g in optimizer.param_groups])
