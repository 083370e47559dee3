"""The frozen reference model of GRQO's KL term (docs/method.md section 3).

A copy of the policy with no gradients, in eval mode, refreshed from the policy at the start of
every epoch (the release), every N steps, or never (config ``grqo.ref_refresh``). It runs only up
to query selection, re-encoding the policy's prompt exemplars with its own prompt encoder, and
returns its objectness at the tokens the policy selected. It keeps only the weights that forward
uses (not the text encoder's or the decoder's).

DeepSpeed: the policy may be a ``DeepSpeedEngine``; under ZeRO-3 its parameters are partitioned
across workers, so a deepcopy would copy empty shards. The reference is therefore always a fresh
model built from the policy's config and loaded with a full state dict gathered with
``deepspeed.zero.GatheredParameters`` (a no-op for stages 0-2).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from dinor1.model.prompts import ExemplarLayout, encode_exemplars
from dinor1.model.wrapped import full_state_dict, unwrap


def parse_refresh(spec: str) -> tuple[str, int]:
    """``"epoch"`` | ``"never"`` | ``"steps:N"`` -> (kind, N)."""
    if spec in ("epoch", "never"):
        return spec, 0
    kind, _, count = spec.partition(":")
    if kind == "steps" and count.isdigit() and int(count) > 0:
        return "steps", int(count)
    raise ValueError(f"grqo.ref_refresh must be 'epoch', 'never' or 'steps:N', got {spec!r}")


def _drop_unused_weights(model: nn.Module) -> set[str]:
    """Free the weights of the submodules the reference forward never runs (the model's
    ``reference_unused_modules()``: for DINO-R1 the text encoder and the decoder, ~120 M of
    swin-t's 174 M parameters); a weight shared with a module still in use is kept. Returns the
    state-dict names of the freed weights (empty tensors from now on)."""
    unused = getattr(model, "reference_unused_modules", None)
    if unused is None:
        return set()
    candidates = {id(p) for module in unused() for p in module.parameters()}
    prefixes = tuple(f"{name}." for name, module in model.named_modules()
                     if any(module is u for u in unused()))
    in_use = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
              if not name.startswith(prefixes)}
    dropped = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in candidates and id(param) not in in_use:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            dropped.add(name)
    return dropped


class ReferenceModel:
    """Frozen policy copy for the objectness KL.

    Args:
        policy: the policy (a DinoR1 or a DeepSpeed engine around one).
        refresh: ``"epoch"``, ``"never"`` or ``"steps:N"``.
        factory: builds an empty model of the policy's architecture (default: from its
            ``config`` and ``settings``).
        device: where the reference runs (default: the policy's device).
    """

    def __init__(self, policy: nn.Module, refresh: str = "epoch",
                 factory: Callable[[], nn.Module] | None = None,
                 device: torch.device | str | None = None):
        self.kind, self.every = parse_refresh(refresh)
        module = unwrap(policy)
        self.factory = factory or (lambda: type(module)(module.config, module.settings))
        self.device = device or next(module.parameters()).device
        self.model = self.factory().to(self.device).eval().requires_grad_(False)
        self.pruned = _drop_unused_weights(self.model)
        self.refreshes = 0
        self.last_refresh_step = 0
        self.seconds = 0.0
        self.calls = 0
        self.refresh(policy, step=0)

    def should_refresh(self, step: int, new_epoch: bool) -> bool:
        if self.kind == "epoch":
            return new_epoch
        if self.kind == "steps":
            return step - self.last_refresh_step >= self.every
        return False

    def refresh(self, policy: nn.Module, step: int) -> None:
        """Copy the policy's current weights into the reference (every worker calls this)."""
        state = {k: v for k, v in full_state_dict(policy).items() if k not in self.pruned}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if set(missing) - self.pruned or unexpected:
            raise ValueError(f"reference refresh: the policy's weights do not match (missing "
                             f"{sorted(set(missing) - self.pruned)[:5]}, unexpected "
                             f"{unexpected[:5]})")
        self.refreshes += 1
        self.last_refresh_step = step

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def objectness(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor,
                   boxes: list[torch.Tensor], exemplars: torch.Tensor | ExemplarLayout,
                   selected_indices: torch.Tensor) -> torch.Tensor:
        """Reference objectness logits at the policy's selected tokens.

        Args:
            pixel_values, pixel_mask: the batch.
            boxes: per image [n_b, 4] GT boxes (the instances the exemplars index).
            exemplars: the policy's prompt exemplars: [U, K, 2] (``TrainingPrompts.exemplars``)
                or their :class:`~dinor1.model.prompts.ExemplarLayout` (``.layout``).
            selected_indices: [B, Q] the policy's selected token indices.

        Returns:
            [B, Q] logits (no graph).
        """
        start = time.perf_counter()
        model = self.model
        features = model.image_features(pixel_values, pixel_mask)
        prompts = encode_exemplars(model, features, boxes, exemplars)
        batch = pixel_values.shape[0]
        out = model.reference_forward(pixel_values, pixel_mask,
                                      prompts[None].expand(batch, -1, -1), features=features)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out.token_objectness.gather(1, selected_indices).clone()

    def stats(self) -> dict[str, float]:
        return {"reference/param_megabytes": self.parameter_bytes / 2**20,
                "reference/seconds_per_call": self.seconds / max(1, self.calls),
                "reference/refreshes": float(self.refreshes)}
