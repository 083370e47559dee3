"""Hungarian matching for DETR-style training, with the cost computed once for all layers.

The matching cost between query i and ground truth j (docs/method.md section 2) is

    C_ij = 2 * focal_cost(p_i[label_j]) + 5 * |box_i - box_j|_1 + 2 * (-GIoU(box_i, box_j)),

``focal_cost(p) = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` (as in Deformable
DETR and DINO). :func:`matching_cost` builds it for every layer and image at once ([L, B, Q, G],
no Python loops); GRQO's rewards reuse the same tensor. :func:`hungarian_match` then solves each
(layer, image) assignment with scipy on the valid ground truths only.

Precision: under bf16 autocast the predictions arrive in bf16, where sigmoid rounds to exactly 1.0
from logit ~6.3 and the cost's -log(1 - p) jumps from ~5.5 to 18.4. The cost is therefore computed
in fp32 from log-sigmoids, which is exact even in fp32 for large |logit| (and for -inf).

Shapes: L prediction sets (decoder layers), B images, Q queries, U prompts (padded prompts carry
logit -inf), G ground truths (padded, ``gt_mask`` marks the real ones). Boxes are normalised
(cx, cy, w, h) unless a name says xyxy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

Match = tuple[torch.Tensor, torch.Tensor]

LOG_COST_EPS = math.log(1e-8)  # the 1e-8 inside the focal cost's logs
# Stands in for non-finite costs so that scipy always finds an assignment (see hungarian_match).
NON_FINITE_COST = 1e8


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Converts boxes [..., 4] from (cx, cy, w, h) to (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU of xyxy boxes, batched over leading dimensions.

    Args:
        a: [..., N, 4] boxes (x0, y0, x1, y1).
        b: [..., M, 4] boxes (x0, y0, x1, y1); leading dimensions broadcast with ``a``'s.

    Returns:
        [..., N, M] GIoU in [-1, 1].
    """
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    # The clamps keep degenerate (zero-area) boxes, e.g. padded GTs, finite instead of 0/0.
    iou = inter / union.clamp(min=1e-9)
    hull_lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    hull_rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    hull = (hull_rb - hull_lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def _neg_log_plus_eps(log_q: torch.Tensor) -> torch.Tensor:
    """-log(q + 1e-8) from log q, elementwise: finite, with zero gradient, where log q = -inf.

    log(q + e) = log e + log(1 + q / e) = log e + softplus(log q - log e), i.e. logaddexp with a
    constant, without materialising the constant as a tensor.
    """
    return -(LOG_COST_EPS + F.softplus(log_q - LOG_COST_EPS))


def matching_cost(logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor,
                  gt_boxes: torch.Tensor, *, class_weight: float, bbox_weight: float,
                  giou_weight: float, alpha: float, gamma: float) -> torch.Tensor:
    """Matching cost of every query against every ground truth, for all layers at once.

    The result stays in the autograd graph (GRQO differentiates through it); detach it before
    :func:`hungarian_match` if only the assignment is needed. Computed in fp32 whatever the
    inputs' dtype, so bf16 predictions only contribute their own rounding; gradients are finite
    for -inf logits.

    Args:
        logits: [L, B, Q, U] (or [B, Q, U]) prompt logits; padded prompts may be -inf.
        boxes: [L, B, Q, 4] (or [B, Q, 4]) predicted boxes, normalised cx, cy, w, h.
        gt_labels: [B, G] prompt index of each GT (-1 = padding).
        gt_boxes: [B, G, 4] normalised cx, cy, w, h.
        class_weight: weight of the focal classification cost.
        bbox_weight: weight of the L1 box cost.
        giou_weight: weight of the -GIoU cost.
        alpha: focal alpha.
        gamma: focal gamma.
            (The five weights: ``ObjectivesConfig.matching_weights()``.)

    Returns:
        [L, B, Q, G] (or [B, Q, G]) fp32 cost; padded GT columns hold finite, meaningless values
        (NaN predictions give NaN costs).
    """
    squeeze = logits.dim() == 3
    if squeeze:
        logits, boxes = logits[None], boxes[None]
    logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
    num_layers, batch, queries, _ = logits.shape
    # Padding labels (-1) gather prompt 0 so the column stays finite; callers mask it out.
    index = gt_labels.clamp(min=0)[None, :, None, :].expand(num_layers, batch, queries, -1)
    logit = logits.gather(-1, index)  # [L, B, Q, G]
    l1 = (boxes[..., :, None, :] - gt_boxes[None, :, None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                               box_cxcywh_to_xyxy(gt_boxes)[None].expand(num_layers, -1, -1, -1))
    cost = (class_weight * _focal_cost(logit, alpha, gamma) + bbox_weight * l1
            - giou_weight * giou)
    return cost[0] if squeeze else cost


def _focal_cost(logit: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """``focal_cost`` of the module docstring, elementwise, in fp32 from the logit.

    log p and log(1 - p) without forming p, whose sigmoid saturates to 1.0 (fp32 from logit ~17)
    and loses 1 - p long before; p^gamma = exp(gamma log p), likewise for 1 - p.
    """
    log_p, log_not_p = F.logsigmoid(logit), F.logsigmoid(-logit)
    pos = alpha * torch.exp(gamma * log_not_p) * _neg_log_plus_eps(log_p)
    neg = (1 - alpha) * torch.exp(gamma * log_p) * _neg_log_plus_eps(log_not_p)
    return pos - neg


def paired_matching_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                         target_boxes: torch.Tensor, *, class_weight: float,
                         bbox_weight: float, giou_weight: float, alpha: float, gamma: float
                         ) -> torch.Tensor:
    """The matching cost of each query against ONE ground truth of its own (fp32, in graph).

    Equal to ``matching_cost(...)[..., q, j_q]`` for a chosen ``j_q`` per query, without the
    [..., Q, G] intermediates: GRQO's reward ``-min_j C_qj`` differentiates only through the
    argmin entry, so its graph needs the cost of that one pair per query (at Q=900 queries and
    G=300 boxes, the full cost's saved intermediates are ~0.5 GB per batch of 4).

    Args:
        logits: [..., Q, U] prompt logits.
        boxes: [..., Q, 4] predicted boxes, normalised cx, cy, w, h.
        labels: [..., Q] prompt index of each query's ground truth (>= 0).
        target_boxes: [..., Q, 4] that ground truth's box.
        class_weight, bbox_weight, giou_weight, alpha, gamma: as :func:`matching_cost`.

    Returns:
        [..., Q] cost.
    """
    logits, boxes, target_boxes = logits.float(), boxes.float(), target_boxes.float()
    logit = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    l1 = (boxes - target_boxes).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes)[..., None, :],
                               box_cxcywh_to_xyxy(target_boxes)[..., None, :])[..., 0, 0]
    return class_weight * _focal_cost(logit, alpha, gamma) + bbox_weight * l1 - giou_weight * giou


def best_match_cost(cost: torch.Tensor, gt_mask: torch.Tensor, logits: torch.Tensor,
                    boxes: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: torch.Tensor, *,
                    class_weight: float, bbox_weight: float, giou_weight: float, alpha: float,
                    gamma: float) -> torch.Tensor:
    """``min_j C_qj`` over the valid ground truths, with the gradient of the full minimum.

    The argmin comes from ``cost`` (no graph needed); the value is recomputed in the graph for
    that pair only (:func:`paired_matching_cost`), so GRQO's differentiable reward costs [L, B, Q]
    of activations instead of [L, B, Q, G].

    Args:
        cost: [L, B, Q, G] matching cost (detached is fine).
        gt_mask: [B, G] bool; images without any GT get an arbitrary finite value (mask it).
        logits, boxes: [L, B, Q, U], [L, B, Q, 4] the predictions ``cost`` was computed from.
        gt_labels, gt_boxes: [B, G], [B, G, 4].
        class_weight, bbox_weight, giou_weight, alpha, gamma: as :func:`matching_cost`.

    Returns:
        [L, B, Q] fp32.
    """
    best = cost.detach().masked_fill(~gt_mask[None, :, None, :], float("inf")).argmin(-1)
    image = torch.arange(gt_mask.shape[0], device=best.device)[None, :, None]
    return paired_matching_cost(logits, boxes, gt_labels[image, best], gt_boxes[image, best],
                                class_weight=class_weight, bbox_weight=bbox_weight,
                                giou_weight=giou_weight, alpha=alpha, gamma=gamma)


def hungarian_match(cost: torch.Tensor,
                    gt_mask: torch.Tensor) -> list[list[Match]] | list[Match]:
    """Optimal one-to-one assignment per (layer, image) over the valid ground truths.

    One device-to-host copy for the whole tensor (and one for ``gt_mask``); scipy then solves
    each small problem. Non-finite costs (NaN or inf, e.g. from NaN logits after a diverged step)
    are replaced by +-1e8 first: scipy raises on them, which would kill the worker inside the
    forward. The assignment then completes and is arbitrary among those entries, while the loss
    computed from the same NaN predictions stays NaN for the training loop's non-finite guard.

    Args:
        cost: [L, B, Q, G] (or [B, Q, G]) matching cost.
        gt_mask: [B, G] bool, True for real ground truths.

    Returns:
        Per layer, per image, (query indices, gt indices) LongTensors on ``cost.device``, sorted
        by query, with gt indices into the padded G axis (a list per image when ``cost`` has no
        layer dimension). When Q < valid GTs, only Q of them are matched.
    """
    squeeze = cost.dim() == 3
    finite = torch.nan_to_num((cost[None] if squeeze else cost).detach().float(),
                              nan=NON_FINITE_COST, posinf=NON_FINITE_COST,
                              neginf=-NON_FINITE_COST)
    cost_np = finite.cpu().numpy()
    valid = [np.flatnonzero(m) for m in gt_mask.cpu().numpy()]
    device = cost.device
    result = []
    for layer_cost in cost_np:
        per_image = []
        for b, gts in enumerate(valid):
            if len(gts) == 0:
                empty = torch.zeros(0, dtype=torch.long, device=device)
                per_image.append((empty, empty.clone()))
                continue
            # scipy returns row indices sorted ascending, i.e. sorted by query.
            rows, cols = linear_sum_assignment(layer_cost[b][:, gts])
            per_image.append((torch.as_tensor(rows, dtype=torch.long, device=device),
                              torch.as_tensor(gts[cols], dtype=torch.long, device=device)))
        result.append(per_image)
    return result[0] if squeeze else result
