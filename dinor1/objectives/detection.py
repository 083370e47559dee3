"""The detection (SFT) loss of one prediction set (docs/method.md section 2).

Sigmoid focal loss (alpha 0.25, gamma 2) over queries x valid prompts, with the matched GT's
prompt as the positive; 5 x L1 and 2 x (1 - GIoU) over matched pairs. Each term is summed and
divided by the number of positives averaged across workers (DETR's normaliser). The training
step applies it to every decoder layer, the encoder proposals and the denoising queries.

Shapes: logits [B, Q, U] (padded prompts -inf, ``prompt_mask`` [B, U] marks the real ones),
boxes [B, Q, 4] normalised (cx, cy, w, h); ground truth gt_labels [B, G] (prompt indices),
gt_boxes [B, G, 4]; matches, per image, (query indices, gt indices).

Computed in fp32 whatever the predictions' dtype (bf16 under autocast), where sigmoid saturates
to 1.0 from logit ~6.3 and the focal factor (1 - p_t)^gamma of a confident positive becomes 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinor1.objectives.matcher import box_cxcywh_to_xyxy, generalized_box_iou


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, prompt_mask: torch.Tensor,
                       *, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise binary focal loss in fp32, zero on padded prompts and on -inf logits.

    Args:
        logits: [..., Q, U] prompt logits.
        targets: [..., Q, U] in {0, 1}.
        prompt_mask: [..., U] bool (e.g. [B, U]), True for real prompts.
        alpha: weight of positives (1 - alpha for negatives; ``objectives.focal_alpha``).
        gamma: focusing exponent (``objectives.focal_gamma``).

    Returns:
        [..., Q, U] fp32 loss, exactly 0 (with zero gradient) where masked.
    """
    logits, targets = logits.float(), targets.float()
    valid = prompt_mask.unsqueeze(-2) & (logits != float("-inf"))
    # BCE of a -inf logit is nan (-inf * 0); substituting 0 keeps NaN out of values and grads.
    safe = torch.where(valid, logits, torch.zeros_like(logits))
    ce = F.binary_cross_entropy_with_logits(safe, targets, reduction="none")
    # 1 - p_t = p (1 - t) + (1 - p) t, with 1 - p taken as sigmoid(-x): subtracting a saturated
    # p from 1 would zero the focal factor of confident predictions.
    one_minus_p_t = safe.sigmoid() * (1 - targets) + (-safe).sigmoid() * targets
    loss = ce * one_minus_p_t**gamma
    loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return torch.where(valid, loss, torch.zeros_like(loss))


def detection_loss(logits: torch.Tensor, boxes: torch.Tensor,
                   matches: Sequence[tuple[torch.Tensor, torch.Tensor]], gt_labels: torch.Tensor,
                   gt_boxes: torch.Tensor, prompt_mask: torch.Tensor, num_boxes: float, *,
                   class_weight: float, bbox_weight: float, giou_weight: float, alpha: float,
                   gamma: float) -> dict[str, torch.Tensor]:
    """Focal + L1 + GIoU loss of one prediction set.

    Args:
        logits: [B, Q, U] prompt logits.
        boxes: [B, Q, 4] predicted boxes, normalised cx, cy, w, h.
        matches: per image, (query indices, gt indices) LongTensors.
        gt_labels: [B, G] prompt indices (-1 = padding; never referenced by a match).
        gt_boxes: [B, G, 4] normalised cx, cy, w, h.
        prompt_mask: [B, U] bool, True for real prompts.
        num_boxes: the normaliser (positives per worker, averaged across workers).
        class_weight: weight of the focal term.
        bbox_weight: weight of the L1 term.
        giou_weight: weight of the 1 - GIoU term.
        alpha: focal alpha.
        gamma: focal gamma.
            (The five weights: ``ObjectivesConfig.loss_weights()``.)

    Returns:
        ``loss_class``, ``loss_bbox``, ``loss_giou``: weighted fp32 scalars; the box terms are 0
        (still in the graph) when nothing is matched.
    """
    logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
    device = logits.device
    batch_idx = torch.cat([torch.full((len(q),), b, dtype=torch.long, device=device)
                           for b, (q, _) in enumerate(matches)])
    query_idx = torch.cat([q.to(device=device, dtype=torch.long) for q, _ in matches])
    gt_idx = torch.cat([g.to(device=device, dtype=torch.long) for _, g in matches])
    # Unmatched queries keep all-zero target rows: every prompt is a negative for them.
    targets = torch.zeros_like(logits)
    targets[batch_idx, query_idx, gt_labels[batch_idx, gt_idx]] = 1.0
    loss_class = sigmoid_focal_loss(logits, targets, prompt_mask, alpha=alpha,
                                    gamma=gamma).sum() / num_boxes
    pred = boxes[batch_idx, query_idx]
    target = gt_boxes[batch_idx, gt_idx]
    loss_bbox = (pred - target).abs().sum() / num_boxes
    # [M, 1, 4] vs [M, 1, 4] -> [M, 1, 1]: the GIoU of each matched pair only, not all pairs.
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred)[:, None],
                               box_cxcywh_to_xyxy(target)[:, None])
    loss_giou = (1 - giou.flatten()).sum() / num_boxes
    return {"loss_class": class_weight * loss_class, "loss_bbox": bbox_weight * loss_bbox,
            "loss_giou": giou_weight * loss_giou}


def num_boxes_across_workers(gt_mask: torch.Tensor) -> float:
    """Valid ground truths in this batch, averaged over data-parallel workers (at least 1).

    Averaging (rather than using the local count) gives every worker the same normaliser, so
    the gradient all-reduce weights boxes equally however they are spread over workers.

    Args:
        gt_mask: [B, G] bool, True for real ground truths.

    Returns:
        The normaliser as a Python float, >= 1.0.
    """
    count = gt_mask.sum().to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and count.device.type != "cuda":
            count = count.cuda()  # NCCL only reduces CUDA tensors
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        count = count / dist.get_world_size()
    return max(float(count), 1.0)
