"""The detection (SFT) loss of one prediction set (METHOD.md section 2).

Sigmoid focal loss (alpha 0.25, gamma 2) over queries x valid prompts, with the matched GT's
prompt as the positive; 5 x L1 and 2 x (1 - GIoU) over matched pairs. Each term is summed and
divided by the number of positives averaged across workers (DETR's normaliser). The training
step applies it to every decoder layer, the encoder proposals and the denoising queries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinor1.objectives.matcher import box_cxcywh_to_xyxy, generalized_box_iou


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, prompt_mask: torch.Tensor,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise focal loss [B, Q, U]; 0 on padded prompts (whose logits are -inf).

    Args:
        logits: [B, Q, U]; targets: [B, Q, U] in {0, 1}; prompt_mask: [B, U] bool.
    """
    valid = prompt_mask[:, None, :].expand_as(logits)
    safe = torch.where(valid, logits, torch.zeros_like(logits))  # keeps -inf out of the graph
    prob = safe.sigmoid()
    ce = F.binary_cross_entropy_with_logits(safe, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss * valid


def detection_loss(logits: torch.Tensor, boxes: torch.Tensor, matches, gt_labels: torch.Tensor,
                   gt_boxes: torch.Tensor, prompt_mask: torch.Tensor, num_boxes: float, *,
                   class_weight: float = 1.0, bbox_weight: float = 5.0, giou_weight: float = 2.0,
                   alpha: float = 0.25, gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """Focal + L1 + GIoU loss of one prediction set.

    Args:
        logits: [B, Q, U]; boxes: [B, Q, 4] normalised cx, cy, w, h.
        matches: per image (query indices, gt indices).
        gt_labels: [B, G] prompt indices; gt_boxes: [B, G, 4]; prompt_mask: [B, U].
        num_boxes: the normaliser (positives per worker, averaged across workers).

    Returns:
        ``loss_class``, ``loss_bbox``, ``loss_giou`` (weighted scalars).
    """
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)])
    query_idx = torch.cat([q for q, _ in matches])
    gt_idx = torch.cat([g for _, g in matches])
    targets = torch.zeros_like(logits)
    targets[batch_idx, query_idx, gt_labels[batch_idx, gt_idx]] = 1.0
    loss_class = sigmoid_focal_loss(logits, targets, prompt_mask, alpha, gamma).sum() / num_boxes
    pred = boxes[batch_idx, query_idx]
    target = gt_boxes[batch_idx, gt_idx]
    loss_bbox = (pred - target).abs().sum() / num_boxes
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred)[:, None], box_cxcywh_to_xyxy(target)[:, None])
    loss_giou = (1 - giou.flatten()).sum() / num_boxes
    return {"loss_class": class_weight * loss_class, "loss_bbox": bbox_weight * loss_bbox,
            "loss_giou": giou_weight * loss_giou}


def num_boxes_across_workers(gt_mask: torch.Tensor) -> float:
    """Positives in this batch, averaged over data-parallel workers (at least 1)."""
    count = gt_mask.sum().to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count), 1.0)
