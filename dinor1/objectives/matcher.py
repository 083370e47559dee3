"""Hungarian matching for DETR-style training, with the cost computed once for all layers.

The matching cost between query i and ground truth j (METHOD.md section 2) is

    C_ij = 2 * focal_cost(p_i[label_j]) + 5 * |box_i - box_j|_1 + 2 * (-GIoU(box_i, box_j)),

``focal_cost(p) = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` (as in Deformable
DETR and DINO). :func:`matching_cost` builds it for every layer and image at once ([L, B, Q, G],
no Python loops); GRQO's rewards reuse the same tensor. :func:`hungarian_match` then solves each
(layer, image) assignment with scipy on the valid ground truths only.

Shapes: L prediction sets (decoder layers), B images, Q queries, U prompts (padded prompts carry
logit -inf), G ground truths (padded, ``gt_mask`` marks the real ones). Boxes are normalised
(cx, cy, w, h) unless a name says xyxy.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

Match = tuple[torch.Tensor, torch.Tensor]


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


def matching_cost(logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor,
                  gt_boxes: torch.Tensor, *, class_weight: float = 2.0, bbox_weight: float = 5.0,
                  giou_weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0
                  ) -> torch.Tensor:
    """Matching cost of every query against every ground truth, for all layers at once.

    The result stays in the autograd graph (GRQO differentiates through it); detach it before
    :func:`hungarian_match` if only the assignment is needed.

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

    Returns:
        [L, B, Q, G] (or [B, Q, G]) cost; padded GT columns hold finite, meaningless values.
    """
    squeeze = logits.dim() == 3
    if squeeze:
        logits, boxes = logits[None], boxes[None]
    num_layers, batch, queries, _ = logits.shape
    # Padding labels (-1) gather prompt 0 so the column stays finite; callers mask it out.
    index = gt_labels.clamp(min=0)[None, :, None, :].expand(num_layers, batch, queries, -1)
    prob = logits.gather(-1, index).sigmoid()  # [L, B, Q, G]; sigmoid(-inf) = 0, no NaN
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    l1 = (boxes[..., :, None, :] - gt_boxes[None, :, None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                               box_cxcywh_to_xyxy(gt_boxes)[None].expand(num_layers, -1, -1, -1))
    cost = class_weight * (pos - neg) + bbox_weight * l1 - giou_weight * giou
    return cost[0] if squeeze else cost


def hungarian_match(cost: torch.Tensor,
                    gt_mask: torch.Tensor) -> list[list[Match]] | list[Match]:
    """Optimal one-to-one assignment per (layer, image) over the valid ground truths.

    One device-to-host copy for the whole tensor; scipy then solves each small problem.

    Args:
        cost: [L, B, Q, G] (or [B, Q, G]) matching cost.
        gt_mask: [B, G] bool, True for real ground truths.

    Returns:
        Per layer, per image, (query indices, gt indices) LongTensors on ``cost.device``, sorted
        by query, with gt indices into the padded G axis (a list per image when ``cost`` has no
        layer dimension). When Q < valid GTs, only Q of them are matched.
    """
    squeeze = cost.dim() == 3
    cost_np = (cost[None] if squeeze else cost).detach().float().cpu().numpy()
    valid = [m.nonzero().flatten().cpu().numpy() for m in gt_mask]
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
