"""The DINO-R1 visual prompt encoder (VPE), METHOD.md section 1.

One layer turns each box prompt into a d-dim embedding that takes the place of a text token:

- content: one learned vector shared by all prompts (``Embedding(1, d)``);
- position: an MLP (4*128 -> d -> d) over the sine encoding of the box (128 features per
  coordinate), the same encoding Grounding DINO's decoder uses for its reference boxes;
- x = LN(x + MSDeformAttn(query=x+pos, value=multi-scale image features before the feature
  enhancer, reference=the box)), sampling 4 points per head and level around the box;
- x = LN(x + SelfAttn(x+pos)) with an identity mask: prompts are independent of each other;
- x = LN(x + FFN(x)).

Deformable attention is `transformers`' own Grounding DINO module.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GroundingDinoConfig
from transformers.models.grounding_dino.modeling_grounding_dino import (
    GroundingDinoMLPPredictionHead,
    GroundingDinoMultiscaleDeformableAttention,
    encode_sinusoidal_position_embedding,
)

SINE_FEATURES = 128  # per box coordinate


def points_to_boxes(points: torch.Tensor, size: float = 0.01) -> torch.Tensor:
    """Point prompts [..., 2] (normalised x, y) as tiny boxes [..., 4] (cx, cy, w, h)."""
    return torch.cat([points, torch.full_like(points, size)], -1)


class VisualPromptEncoder(nn.Module):
    """Box prompts -> prompt embeddings.

    Args:
        config: the Grounding DINO config (d_model, num_feature_levels, layer_norm_eps).
        num_heads, num_points: deformable attention heads and sampling points per level.
        ffn_dim: hidden size of the feed-forward block.
        dropout: dropout after each block.
    """

    def __init__(self, config: GroundingDinoConfig, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        d_model, eps = config.d_model, config.layer_norm_eps
        self.content = nn.Embedding(1, d_model)
        self.position = GroundingDinoMLPPredictionHead(4 * SINE_FEATURES, d_model, d_model, 2)
        self.cross_attn = GroundingDinoMultiscaleDeformableAttention(config, num_heads, num_points)
        self.cross_norm = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout,
                                               batch_first=True)
        self.self_norm = nn.LayerNorm(d_model, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))
        self.ffn_norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, boxes: torch.Tensor, features: torch.Tensor,
                feature_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                spatial_shapes_list: list[tuple[int, int]], level_start_index: torch.Tensor,
                valid_ratios: torch.Tensor, box_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode box prompts.

        Args:
            boxes: [B, P, 4] normalised cx, cy, w, h (relative to the unpadded image).
            features: [B, S, d] flattened multi-scale features before the enhancer.
            feature_padding_mask: [B, S] bool, True on padded pixels.
            spatial_shapes: [L, 2]; spatial_shapes_list: the same as tuples.
            level_start_index: [L]; valid_ratios: [B, L, 2] (w, h) unpadded fraction per level.
            box_mask: [B, P] bool, True for real prompts; None = all real.

        Returns:
            [B, P, d] prompt embeddings; zero rows for padded prompts.
        """
        batch, count = boxes.shape[:2]
        # box in padded-image coordinates at every level, as Grounding DINO's decoder does
        reference = boxes[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        pos = self.position(encode_sinusoidal_position_embedding(
            reference[:, :, 0], num_pos_feats=SINE_FEATURES))
        x = self.content.weight[None].expand(batch, count, -1)
        attended, _ = self.cross_attn(
            hidden_states=x, attention_mask=~feature_padding_mask,
            encoder_hidden_states=features, position_embeddings=pos,
            reference_points=reference, spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list, level_start_index=level_start_index)
        x = self.cross_norm(x + self.dropout(attended))
        only_self = ~torch.eye(count, dtype=torch.bool, device=boxes.device)
        q = x + pos
        attended, _ = self.self_attn(q, q, x, attn_mask=only_self, need_weights=False)
        x = self.self_norm(x + self.dropout(attended))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        if box_mask is not None:
            x = x * box_mask[..., None].to(x.dtype)
        return x
