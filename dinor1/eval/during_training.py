"""Evaluation inside the training workers every ``eval.every_epochs`` epochs.

Each worker detects on its own split of the val set with generic prompts it builds from the
whole support set (read in order, so every rank builds the same prompts), the detections are
gathered to rank 0, which scores them with pycocotools and logs ``eval/generic/*`` into the
training run. Every rank runs the same forward passes, so this also works with ZeRO-3 where the
weights are partitioned. Shards' LVIS negatives are not carried here: LVIS numbers come from
``dinor1 eval``. The val set's bad input is counted as in ``dinor1 eval``
(``eval/skipped/<kind>``, ``eval/dropped_boxes/<rule>``, ...; scoring is against the cleaned
ground truth); the support set's is not (every rank reads all of it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dinor1.data.quality import QualityCounter
from dinor1.eval.inference import boxes_to_xywh, detect_generic
from dinor1.model.prompts import build_generic_prompts


def batch_ground_truth(batch: dict) -> tuple[list[dict], list[dict]]:
    """COCO image entries and annotations (original pixels) of a collated eval batch."""
    counts = batch["num_boxes"].tolist()
    images, annotations = [], []
    for b, (boxes, labels) in enumerate(zip(batch["boxes"].split(counts),
                                            batch["class_labels"].split(counts))):
        height, width = (int(v) for v in batch["orig_sizes"][b])
        image_id = int(batch["image_ids"][b])
        images.append({"id": image_id, "height": height, "width": width})
        xywh = boxes_to_xywh(boxes[None].float().cpu(), batch["orig_sizes"][b:b + 1].cpu())[0]
        annotations.extend({"image_id": image_id, "category_id": int(c),
                            "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                            "iscrowd": 0} for c, box in zip(labels.tolist(), xywh.tolist()))
    return images, annotations


def evaluate_during_training(model, val_batches, support_batches, categories: list[dict], *,
                             per_class: int, top_k: int, chunk_size: int,
                             skipped_errors: list[str] | None = None) -> dict[str, float]:
    """Distributed generic-prompt evaluation; returns the metrics on rank 0, {} elsewhere.

    Args:
        model: the (unwrapped) DinoR1 being trained; put back in train mode afterwards.
        val_batches / support_batches: collated eval batches (this rank's val split; the whole
            support set).
        categories: COCO category entries of the val set (``novel`` marks unseen classes).
        skipped_errors: if given, rank 0 appends the messages of the val samples skipped (the
            first 50 of each rank).
    """
    from dinor1.eval.scoring import coco_ground_truth, score_coco

    was_training = model.training
    model.eval()
    names = {c["id"]: c["name"] for c in categories}
    with torch.no_grad():
        prompts = build_generic_prompts(model, support_batches, names, per_class=per_class,
                                        allow_missing=True)
    images, annotations, detections, quality = [], [], [], QualityCounter()
    for batch in val_batches:
        quality.update(batch)
        if len(batch["image_ids"]) == 0:
            continue
        detections.extend(d for per_image in detect_generic(model, batch, prompts, top_k=top_k,
                                                            chunk_size=chunk_size)
                          for d in per_image)
        more_images, more_annotations = batch_ground_truth(batch)
        images.extend(more_images)
        annotations.extend(more_annotations)
    model.train(was_training)
    payload = (images, annotations, detections, quality.state_dict())
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if dist.get_rank() != 0:
            return {}
    else:
        gathered = [payload]
    images = list({im["id"]: im for part in gathered for im in part[0]}.values())
    annotations = [a for part in gathered for a in part[1]]
    detections = [d for part in gathered for d in part[2]]
    novel = [c["id"] for c in categories if c.get("novel")]
    score = score_coco(coco_ground_truth(images, annotations, categories), detections,
                       novel_category_ids=novel)
    metrics = {f"eval/generic/{k}": float(v) for k, v in score.metrics.items()}
    metrics["eval/images"] = float(len(images))
    total = QualityCounter(max_errors=None)
    for part in gathered:
        total.merge(QualityCounter.from_state_dict(part[3]))
    metrics.update(total.metrics("eval/", reduce=False))
    if skipped_errors is not None:
        skipped_errors.extend(total.errors)
    return metrics
