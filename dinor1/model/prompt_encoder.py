"""The DINO-R1 visual prompt encoder (VPE), docs/method.md section 1.

METHOD: one layer turns each box prompt into a d-dim embedding that takes the place of a text
token in Grounding DINO:

- content: ONE learned query shared by all prompts (``Embedding(1, d)``), so a prompt is told
  apart only by where it points;
- position: an MLP (4*128 -> d -> d) over the sine encoding of the box (128 features per
  coordinate, temperature 10000), the encoding Grounding DINO's decoder uses for its 4-d
  reference boxes;
- x = LN(x + MSDeformAttn(query=x+pos, value=the multi-scale image features BEFORE the feature
  enhancer, reference=the box)), 4 points per head and level sampled around the box;
- x = LN(x + SelfAttn(q=k=x+pos, v=x)) with an identity mask: prompts stay independent;
- x = LN(x + FFN(x)).

Deformable attention, the sine encoding and the MLP are `transformers`' Grounding DINO code.
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

SINE_FEATURES = 128  # per box coordinate, fixed by the method (not d_model // 2)
_DUMMY_BOX = (0.5, 0.5, 0.5, 0.5)  # stands in for padded prompts so garbage there cannot go NaN


def points_to_boxes(points: torch.Tensor, size: float = 0.01) -> torch.Tensor:
    """Turn point prompts into tiny boxes centred on the points.

    Args:
        points: [..., 2] normalised (x, y).
        size: width and height of the box, normalised.

    Returns:
        [..., 4] normalised (cx, cy, w, h).
    """
    return torch.cat([points, torch.full_like(points, size)], -1)


class VisualPromptEncoder(nn.Module):
    """Box prompts -> prompt embeddings (one encoder layer).

    Args:
        config: Grounding DINO config; d_model, num_feature_levels and layer_norm_eps are used.
        num_heads: heads of the deformable and of the self attention.
        num_points: deformable sampling points per head and level.
        ffn_dim: hidden size of the feed-forward block.
        dropout: dropout after each block (and inside the FFN and self attention).
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
        """Encode box prompts against one batch of images.

        Args:
            boxes: [B, P, 4] normalised (cx, cy, w, h), relative to the unpadded image.
            features: [B, S, d] flattened multi-scale features before the feature enhancer,
                S = sum over levels of H_l * W_l.
            feature_padding_mask: [B, S] bool, True on padded pixels.
            spatial_shapes: [L, 2] long, (H_l, W_l) per level.
            spatial_shapes_list: the same as a list of (H_l, W_l) tuples.
            level_start_index: [L] offset of each level in S.
            valid_ratios: [B, L, 2] unpadded fraction (w, h) per level, as HF's
                ``get_valid_ratio`` returns it.
            box_mask: [B, P] bool, True for real prompts; None means all are real.

        Returns:
            [B, P, d] prompt embeddings; rows of padded prompts are exactly zero.
        """
        batch, count = boxes.shape[:2]
        if box_mask is not None:
            boxes = torch.where(box_mask[..., None], boxes, boxes.new_tensor(_DUMMY_BOX))
        # Boxes are relative to the unpadded image; deformable attention samples the padded
        # map, so scale (cx, w) by the width ratio and (cy, h) by the height ratio per level,
        # exactly as GroundingDinoDecoder does for 4-d reference points: [B, P, L, 4].
        ratios = torch.cat([valid_ratios, valid_ratios], -1).to(boxes.dtype)
        reference = boxes[:, :, None] * ratios[:, None]
        # As in the HF decoder, the query position comes from the level-0 scaled box.
        pos = self.position(encode_sinusoidal_position_embedding(
            reference[:, :, 0], num_pos_feats=SINE_FEATURES, temperature=10000))
        x = self.content.weight[None].expand(batch, count, -1)
        attended, _ = self.cross_attn(
            hidden_states=x, attention_mask=~feature_padding_mask,  # HF wants True = valid
            encoder_hidden_states=features, position_embeddings=pos,
            reference_points=reference, spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list, level_start_index=level_start_index)
        x = self.cross_norm(x + self.dropout(attended))
        # Every row keeps its own diagonal entry, so no row is fully masked (no NaN softmax).
        only_self = ~torch.eye(count, dtype=torch.bool, device=boxes.device)
        q = x + pos
        attended, _ = self.self_attn(q, q, x, attn_mask=only_self, need_weights=False)
        x = self.self_norm(x + self.dropout(attended))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        if box_mask is not None:
            x = torch.where(box_mask[..., None], x, torch.zeros_like(x))
        return x
