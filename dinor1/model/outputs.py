"""Typed inputs and outputs of the DINO-R1 model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """Multi-scale image features before the feature enhancer, flattened over levels.

    ``S`` = sum over levels of H_l * W_l.
    """

    source: torch.Tensor  # [B, S, d]
    valid: torch.Tensor  # [B, S] bool, True on real (unpadded) pixels
    position: torch.Tensor  # [B, S, d] sine position + level embedding
    spatial_shapes: torch.Tensor  # [L, 2] (H_l, W_l)
    spatial_shapes_list: list[tuple[int, int]]
    level_start_index: torch.Tensor  # [L]
    valid_ratios: torch.Tensor  # [B, L, 2]


@dataclass
class PromptInputs:
    """The "text" stream of the feature enhancer: visual prompt embeddings or text tokens.

    Visual prompts: every prompt attends only to itself (identity mask) and has position id 0.
    Text: Grounding DINO's sub-sentence masks and position ids from the tokenizer output.
    """

    embeddings: torch.Tensor  # [B, U, d] before the enhancer
    mask: torch.Tensor  # [B, U] bool, True for real prompts / tokens
    self_attention: torch.Tensor  # [B, U, U] bool, True where attention is allowed
    position_ids: torch.Tensor  # [B, U] long
    kind: str  # "visual" | "text"


@dataclass
class DinoR1Output:
    """Everything the objectives need from one forward pass.

    ``L`` decoder layers, ``Q`` matching queries, ``U`` prompts, ``Nd`` denoising queries.
    """

    logits: torch.Tensor  # [L, B, Q, U] per decoder layer
    boxes: torch.Tensor  # [L, B, Q, 4] normalised cx, cy, w, h
    encoder_logits: torch.Tensor  # [B, Q, U] encoder proposals at the selected tokens (in graph)
    encoder_boxes: torch.Tensor  # [B, Q, 4] encoder proposal boxes (in graph)
    selected_indices: torch.Tensor  # [B, Q] token indices chosen by query selection
    objectness: torch.Tensor  # [B, Q] max over prompts of the encoder logits at those tokens
    prompt_mask: torch.Tensor  # [B, U]
    prompts: torch.Tensor  # [B, U, d] enhanced prompt embeddings
    dn_logits: torch.Tensor | None = None  # [L, B, Nd, U]
    dn_boxes: torch.Tensor | None = None  # [L, B, Nd, 4]
    dn_meta: object | None = None  # dinor1.model.denoising.DenoisingMeta

    @property
    def pred_logits(self) -> torch.Tensor:
        return self.logits[-1]

    @property
    def pred_boxes(self) -> torch.Tensor:
        return self.boxes[-1]


@dataclass
class ReferenceOutput:
    """What the frozen reference model contributes to GRQO's KL term."""

    token_objectness: torch.Tensor  # [B, S] max over prompts of the encoder logits, every token
    selected_indices: torch.Tensor  # [B, Q] the reference's own top-K (for diagnostics)
