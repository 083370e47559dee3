"""GRQO: Group Relative Query Optimization (docs/method.md section 3).

Each image's Q matching queries form a group. A query's reward is how well it aligns with its
best ground truth, ``r_i = -min_j C_ij`` with C the Hungarian matching cost; advantages are the
rewards z-scored within the group, ``A_i = (r_i - mean r) / (std r + 2e-9)`` (unbiased std), and
the last ``num_mute`` queries in top-K order get ``A_i = 0`` (without the mute the advantages of a
group sum to exactly 0). A KL term (the k3 estimator) keeps the policy's query objectness close
to a frozen reference model's objectness at the same tokens.

Two forms (config ``grqo.form``):

- ``release`` (the authors' code): ``L_l = mean(-alpha * A + beta * KL)`` with A differentiable
  through the reward, i.e. through the matching cost into the predictions;
- ``policy_gradient`` (DECISION, ours):
  ``L_l = mean(-alpha * A.detach() * log sigmoid(s) + beta * KL)`` with ``s`` the query's score:
  its best prompt logit at layer l ([L, B, Q], config ``grqo.pg_score: decoder``) or its encoder
  objectness, the quantity the KL term regularises ([B, Q], ``grqo.pg_score: objectness``).

Summed over decoder layers, as in the release. Everything here is computed in fp32 whatever the
inputs' dtype (bf16 under autocast): in bf16 the KL of a small policy drift rounds to 0 or below,
and the z-scores of close rewards to a few levels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 2e-9


def query_rewards(cost: torch.Tensor, gt_mask: torch.Tensor, *, return_has_gt: bool = False):
    """Per-query rewards from the matching cost.

    Args:
        cost: [B, Q, G] or [L, B, Q, G] matching cost (lower is better).
        gt_mask: [B, G] bool, True for real ground truths.
        return_has_gt: also return the [B] flag of images that have any ground truth.

    Returns:
        [B, Q] (or [L, B, Q]) fp32 rewards ``-min_j C_ij`` over valid GTs; 0 for images without
        GT.
    """
    valid = gt_mask[:, None, :]
    best = cost.float().masked_fill(~valid, float("inf")).min(-1).values
    has_gt = gt_mask.any(-1)
    rewards = torch.where(has_gt[:, None], -best, torch.zeros_like(best))
    return (rewards, has_gt) if return_has_gt else rewards


def grqo_advantages(rewards: torch.Tensor, num_mute: int, has_gt: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Group-relative advantages: z-score over each image's queries, then mute the tail.

    Args:
        rewards: [B, Q] (or [L, B, Q]) in top-K order (best-ranked query first).
        num_mute: how many of the last queries get advantage 0.
        has_gt: [B] bool; images without ground truth get all-zero advantages.

    Returns:
        fp32 advantages with the shape of ``rewards``.
    """
    rewards = rewards.float()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # unbiased, as torch's default (and the release)
    advantages = (rewards - mean) / (std + EPS)
    num_queries = rewards.shape[-1]
    keep = torch.ones(num_queries, dtype=rewards.dtype, device=rewards.device)
    if num_mute > 0:
        keep[max(0, num_queries - num_mute):] = 0
    advantages = advantages * keep
    if has_gt is not None:
        advantages = advantages * has_gt[:, None].to(rewards.dtype)
    return advantages


def _log_sigmoid_plus_eps(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """log(sigmoid(x) + eps) in fp32: log eps + softplus(log sigmoid(x) - log eps), finite."""
    log_eps = math.log(eps)
    return log_eps + F.softplus(F.logsigmoid(logits.float()) - log_eps)


def objectness_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, eps: float = EPS
                  ) -> torch.Tensor:
    """k3 estimator of KL[policy || reference] on sigmoid objectness, elementwise, in fp32.

    ``(r + eps) / (p + eps) - log(r + eps) + log(p + eps) - 1`` with p, r the policy and
    reference probabilities; >= 0, and 0 where p == r. Evaluated as ``expm1(d) - d`` with
    ``d = log(r + eps) - log(p + eps)`` (the same value): the ratio form loses a small drift to
    rounding, and in log space sigmoid's saturation never enters.

    Args:
        policy_logits: [...] policy objectness logits.
        ref_logits: [...] reference objectness logits (detached here).
        eps: the k3 estimator's smoothing constant.

    Returns:
        [...] fp32 KL estimates.
    """
    d = (_log_sigmoid_plus_eps(ref_logits.detach(), eps)
         - _log_sigmoid_plus_eps(policy_logits, eps))
    return torch.expm1(d) - d


def grqo_loss(cost: torch.Tensor, gt_mask: torch.Tensor, policy_objectness: torch.Tensor,
              ref_objectness: torch.Tensor, *, form: str, alpha: float, beta: float,
              num_mute: int, scores: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The GRQO term, summed over decoder layers.

    Args:
        cost: [L, B, Q, G] matching cost of every layer (keep it in the graph for ``release``).
        gt_mask: [B, G].
        policy_objectness: [B, Q] policy objectness logits at its selected tokens.
        ref_objectness: [B, Q] reference objectness logits at the POLICY's selected tokens.
        form: ``"release"`` or ``"policy_gradient"`` (config ``grqo.form``).
        alpha, beta: advantage and KL weights (``grqo.alpha``, ``grqo.beta``).
        num_mute: muted tail queries per group (``GRQOConfig.muted_queries``).
        scores: the policy-gradient form's query logits: [L, B, Q] per layer, or [B, Q] for
            every layer (e.g. the objectness).

    Returns:
        (loss, diagnostics): the fp32 scalar loss, and name -> 0-dim detached fp32 tensor or
        float: reward/advantage statistics, the KL mean, images without GT (tensors, on the
        inputs' device: nothing here waits for the device, the caller reads them all at once),
        the muted fraction and the layer count (floats, known from shapes).
    """
    if form not in ("release", "policy_gradient"):
        raise ValueError(f"grqo form must be 'release' or 'policy_gradient', got {form!r}")
    rewards, has_gt = query_rewards(cost, gt_mask, return_has_gt=True)
    advantages = grqo_advantages(rewards, num_mute, has_gt)
    kl = objectness_kl(policy_objectness, ref_objectness)
    num_layers = cost.shape[0]
    if form == "release":
        per_layer = (-alpha * advantages + beta * kl[None]).mean(dim=(1, 2))
    else:
        if scores is None:
            raise ValueError("the policy_gradient form needs per-layer query scores")
        log_prob = F.logsigmoid(scores.float())
        if log_prob.dim() == 2:  # one score per query for every layer
            log_prob = log_prob[None]
        per_layer = (-alpha * advantages.detach() * log_prob + beta * kl[None]).mean(dim=(1, 2))
    loss = per_layer.sum()
    rewards, advantages, kl = rewards.detach(), advantages.detach(), kl.detach()
    # Reward statistics over the images that have a GT (all images when none has), as a
    # weighted mean: boolean indexing or `if has_gt.any()` would wait for the device.
    weight = torch.where(has_gt.any(), has_gt, torch.ones_like(has_gt)).float()  # [B]
    group_count = weight.sum() * num_layers
    reward_mean = (rewards.mean(-1) * weight).sum() / group_count
    if rewards.shape[-1] > 1:
        reward_std = (rewards.std(-1) * weight).sum() / group_count
    else:
        reward_std = torch.zeros((), device=rewards.device)
    diagnostics = {
        "grqo/reward_mean": reward_mean,
        "grqo/reward_std": reward_std,
        "grqo/advantage_mean": advantages.mean(),
        "grqo/advantage_abs_mean": advantages.abs().mean(),
        "grqo/advantage_max": advantages.max(),
        "grqo/advantage_min": advantages.min(),
        "grqo/kl_mean": kl.mean(),
        "grqo/muted_fraction": min(num_mute, rewards.shape[-1]) / rewards.shape[-1],
        "grqo/images_without_gt": (~has_gt).sum().float(),
        "grqo/layers": float(num_layers),
    }
    return loss, diagnostics
