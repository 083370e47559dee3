"""Visual-text contrastive loss (docs/method.md section 2), used where class names exist.

For each class u of the batch, ``v_u`` is the mean prompt-encoder output over its instances and
``t_u`` the (frozen) text embedding of its name; ``logits = exp(tau) * cos(t_u, v_w)`` with a
learnable temperature ``tau`` (initialised at log(1/0.07)); the loss is the symmetric
cross-entropy of matching each visual prompt to its own class name and back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_LOG_SCALE = math.log(1 / 0.07)


class VisualTextContrastive(nn.Module):
    """Symmetric InfoNCE between visual prompts and class-name embeddings."""

    def __init__(self, init_log_scale: float = INIT_LOG_SCALE):
        super().__init__()
        # shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which a
        # 0-dim tensor cannot take
        self.log_scale = nn.Parameter(torch.tensor([float(init_log_scale)]))

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """visual, text: [U, d] (row u of each is class u). Returns a scalar loss."""
        if visual.shape[0] < 2:  # one class has nothing to be contrasted with
            return visual.sum() * 0.0
        logits = self.log_scale.exp() * F.normalize(text, dim=-1) @ F.normalize(visual, dim=-1).T
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def mean_instance_embeddings(instances: torch.Tensor, instance_mask: torch.Tensor,
                             labels: list[torch.Tensor], category_ids: torch.Tensor
                             ) -> torch.Tensor:
    """``v_u``: the mean prompt embedding of every instance of each prompt's category.

    Args:
        instances: [B, P, d]; instance_mask: [B, P]; labels: per image [n_b] category ids;
        category_ids: [U].

    Returns:
        [U, d].
    """
    flat = instances[instance_mask]  # [N, d] in image order, as labels are
    flat_labels = torch.cat([lab.to(flat.device) for lab in labels])
    one_hot = (flat_labels[None, :] == category_ids.to(flat.device)[:, None]).to(flat.dtype)
    return one_hot @ flat / one_hot.sum(1, keepdim=True).clamp(min=1)
