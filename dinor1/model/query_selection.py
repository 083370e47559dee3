"""Prompt classification and visual-guided query selection (DINO-R1, docs/method.md section 1).

With visual prompts, a query's score for prompt ``u`` is a scaled dot product against the
enhanced prompt embedding plus a learnable per-layer bias,

    s_{q,u} = <h_q, v'_u> / sqrt(d) + bias_l,   bias_l initialised at -log((1 - 0.01) / 0.01),

used for the encoder proposals (layer index 0) and for every decoder layer (1..L). Padded prompts
score ``-inf``. The text path keeps Grounding DINO's own contrastive head instead (plain dot
product, no bias), so that the model given text is exactly Grounding DINO.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PromptClassifier(nn.Module):
    """Scaled dot-product classifier against prompt embeddings, one bias per layer.

    Args:
        d_model: embedding size.
        num_layers: number of heads sharing the scale (encoder proposals + decoder layers).
        prior_prob: the initial foreground probability that sets the bias.
    """

    def __init__(self, d_model: int, num_layers: int, prior_prob: float = 0.01):
        super().__init__()
        self.scale = 1.0 / math.sqrt(d_model)
        bias = -math.log((1 - prior_prob) / prior_prob)
        self.bias = nn.Parameter(torch.full((num_layers,), bias))

    def forward(self, queries: torch.Tensor, prompts: torch.Tensor, prompt_mask: torch.Tensor,
                layer: int) -> torch.Tensor:
        """Scores of every query against every prompt.

        Args:
            queries: [B, Q, d] query (or encoder token) features.
            prompts: [B, U, d] enhanced prompt embeddings.
            prompt_mask: [B, U] bool, True for real prompts.
            layer: 0 for encoder proposals, 1..L for decoder layers.

        Returns:
            [B, Q, U] logits; ``-inf`` for padded prompts.
        """
        logits = torch.einsum("bqd,bud->bqu", queries, prompts) * self.scale + self.bias[layer]
        return logits.masked_fill(~prompt_mask[:, None, :], float("-inf"))


def select_queries_by_prompts(token_logits: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Visual-guided query selection: the top-K image tokens by their best prompt score.

    Args:
        token_logits: [B, S, U] encoder logits of every image token against every prompt.
        num_queries: K.

    Returns:
        [B, K] token indices, best first.
    """
    objectness = token_logits.max(-1).values
    if objectness.shape[1] < num_queries:
        raise ValueError(f"query selection needs at least {num_queries} encoder tokens (the "
                         f"model's num_queries); these images give {objectness.shape[1]}: use "
                         "larger images (data.*_short_side(s)) or a model with fewer queries")
    return torch.topk(objectness, num_queries, dim=1).indices
