"""Speed options of a DinoR1 model: ``torch.compile`` of its hot submodules and channels-last.

``torch.compile`` of the whole step does not work: the step calls scipy's Hungarian solver,
builds prompts and denoising queries with data-dependent shapes, and DeepSpeed wraps the
module. The compute, though, sits in a few repeated submodules (the backbone, the feature
enhancer's layers, the decoder layers, the visual prompt encoder), each a clean tensor-in,
tensor-out function. :func:`compile_hot_modules` compiles those in place with
``nn.Module.compile`` (their parameter names, hence state dicts, checkpoints and DeepSpeed's
partitioning, stay as they are); the glue between them runs eagerly.

Channels-last (:func:`use_channels_last`) stores 4-D conv weights NHWC and makes the model feed
its backbone NHWC pixels. Whether either helps is a measurement, not a rule:
``dinor1 bench model --compare compile|channels_last`` prints the ratio on the machine at hand.
"""

from __future__ import annotations

import torch
from torch import nn


def hot_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules that hold most of a DinoR1 step's compute, by their dotted names."""
    core = model.gdino.model
    modules = {"gdino.model.backbone": core.backbone, "prompt_encoder": model.prompt_encoder}
    for i, layer in enumerate(core.encoder.layers):
        modules[f"gdino.model.encoder.layers.{i}"] = layer
    for i, layer in enumerate(core.decoder.layers):
        modules[f"gdino.model.decoder.layers.{i}"] = layer
    return modules


def compile_hot_modules(model: nn.Module, *, backend: str = "inductor",
                        mode: str | None = None) -> list[str]:
    """Compile :func:`hot_modules` in place (``nn.Module.compile``); returns their names.

    Shapes change from batch to batch (multi-scale training, prompts per batch), so dynamic
    shapes are left to torch's default: a module is recompiled with symbolic sizes the first
    time a size changes, not once per size.
    """
    modules = hot_modules(model)
    for module in modules.values():
        module.compile(backend=backend, mode=mode)
    return list(modules)


def use_channels_last(model: nn.Module) -> None:
    """NHWC conv weights, and NHWC pixels into the backbone (:meth:`DinoR1.image_features`)."""
    model.to(memory_format=torch.channels_last)
    model.channels_last = True
