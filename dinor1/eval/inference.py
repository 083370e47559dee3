"""Batched inference: a model + a prompt mode -> COCO-format detections per image.

Prompt modes (docs/method.md section 1, "Generic prompts for evaluation"):

- ``generic``: one averaged visual prompt per class, built from a support split
  (:func:`~dinor1.model.prompts.build_generic_prompts`), the same for every image. Classes are
  run in chunks of ``chunk_size`` prompts (LVIS has 1203) and the candidates merged.
- ``text``: the class names through Grounding DINO's text path ("cat . dog ."); a class's score
  is the max over its tokens.
- ``interactive``: prompts from the ground-truth boxes of the same image (one averaged prompt
  per class present), so only those classes are detected; reported apart from the others.

:class:`BatchPredictor` is the Ray Data ``map_batches`` callable (one model per actor); it takes
decoded rows (:class:`~dinor1.data.transforms.DecodeSample`), collates them, detects, and returns
one row per input row: the detections, the ground truth it saw, or the error that skipped it.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from dinor1.model.prompts import GenericPrompts, pad_instances

PROMPT_MODES = ("generic", "text", "interactive")


def boxes_to_xywh(boxes: torch.Tensor, orig_sizes: torch.Tensor) -> torch.Tensor:
    """Normalised cx, cy, w, h [B, N, 4] -> pixel x, y, w, h of each original image, clipped."""
    height, width = orig_sizes[:, 0, None].float(), orig_sizes[:, 1, None].float()
    x0 = ((boxes[..., 0] - boxes[..., 2] / 2) * width).clamp(min=0).minimum(width)
    y0 = ((boxes[..., 1] - boxes[..., 3] / 2) * height).clamp(min=0).minimum(height)
    x1 = ((boxes[..., 0] + boxes[..., 2] / 2) * width).clamp(min=0).minimum(width)
    y1 = ((boxes[..., 1] + boxes[..., 3] / 2) * height).clamp(min=0).minimum(height)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], -1)


def top_detections(scores: torch.Tensor, boxes: torch.Tensor, category_ids: torch.Tensor,
                   image_ids: list[int], orig_sizes: torch.Tensor, top_k: int) -> list[list[dict]]:
    """The ``top_k`` (query, class) pairs of each image as COCO results dicts.

    Args:
        scores: [B, N, C] probabilities (0 for padded prompts).
        boxes: [B, N, 4] normalised cx, cy, w, h, one box per candidate query.
        category_ids: [B, C] dataset category id of each prompt column (-1 = padding).
        image_ids: B ids; orig_sizes: [B, 2] (height, width).
    """
    batch, candidates, classes = scores.shape
    pixel = boxes_to_xywh(boxes, orig_sizes)
    k = min(top_k, candidates * classes)
    values, flat = scores.flatten(1).topk(k, dim=1)
    query, column = flat // classes, flat % classes
    out = []
    for b in range(batch):
        keep = (values[b] > 0) & (category_ids[b, column[b]] >= 0)
        picked_boxes = pixel[b, query[b][keep]].tolist()
        cats = category_ids[b, column[b][keep]].tolist()
        out.append([{"image_id": int(image_ids[b]), "category_id": int(c),
                     "bbox": [round(v, 2) for v in box], "score": round(float(s), 5)}
                    for c, box, s in zip(cats, picked_boxes, values[b][keep].tolist())])
    return out


def _merge_chunks(results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Chunks of (scores [B, Q, c], boxes [B, Q, 4], ids [B, c]) -> one candidate set.

    Each chunk has its own queries, so candidates are (chunk query, class) pairs: scores become
    block-diagonal [B, sum Q, sum c] with zeros off the chunk's own classes.
    """
    if len(results) == 1:
        return results[0]
    batch = results[0][0].shape[0]
    total_q = sum(s.shape[1] for s, _, _ in results)
    total_c = sum(s.shape[2] for s, _, _ in results)
    scores = results[0][0].new_zeros(batch, total_q, total_c)
    q = c = 0
    for s, _, _ in results:
        scores[:, q:q + s.shape[1], c:c + s.shape[2]] = s
        q, c = q + s.shape[1], c + s.shape[2]
    return (scores, torch.cat([b for _, b, _ in results], 1),
            torch.cat([i for _, _, i in results], 1))


@torch.inference_mode()
def detect_generic(model, batch: dict, prompts: GenericPrompts, *, top_k: int = 300,
                   chunk_size: int = 80) -> list[list[dict]]:
    """Every class's generic prompt on every image of a collated batch."""
    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    size = len(pixel_values)
    features = model.image_features(pixel_values, pixel_mask)
    embeddings = prompts.embeddings.to(pixel_values.device, pixel_values.dtype)
    ids = torch.tensor(prompts.category_ids, device=pixel_values.device)
    results = []
    for start in range(0, len(ids), chunk_size):
        chunk = embeddings[start:start + chunk_size]
        out = model(pixel_values, pixel_mask,
                    model.visual_prompts(chunk[None].expand(size, -1, -1)), features=features)
        results.append((out.pred_logits.sigmoid(), out.pred_boxes,
                        ids[start:start + chunk_size][None].expand(size, -1)))
    scores, boxes, category_ids = _merge_chunks(results)
    return top_detections(scores, boxes, category_ids, batch["image_ids"].tolist(),
                          batch["orig_sizes"], top_k)


@torch.inference_mode()
def detect_text(model, batch: dict, tokenizer, names: list[str], category_ids: list[int], *,
                top_k: int = 300) -> list[list[dict]]:
    """Class names as Grounding DINO captions (split to fit ``max_text_len``)."""
    from dinor1.model.text import class_captions, class_logits

    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    size, device = len(pixel_values), pixel_values.device
    features = model.image_features(pixel_values, pixel_mask)
    results = []
    for members, caption in class_captions(tokenizer, names, model.config.max_text_len):
        ids = caption.input_ids.to(device).expand(size, -1)
        inputs = model.text_prompts(ids, caption.attention_mask.to(device).expand(size, -1))
        out = model(pixel_values, pixel_mask, inputs, features=features)
        scores = class_logits(out.pred_logits, caption.spans).sigmoid()
        cats = torch.tensor([category_ids[i] for i in members], device=device)
        results.append((scores, out.pred_boxes, cats[None].expand(size, -1)))
    scores, boxes, cats = _merge_chunks(results)
    return top_detections(scores, boxes, cats, batch["image_ids"].tolist(), batch["orig_sizes"],
                          top_k)


@torch.inference_mode()
def detect_interactive(model, batch: dict, *, top_k: int = 300) -> list[list[dict]]:
    """Prompts from each image's own ground-truth boxes: one averaged prompt per class present.

    An image without boxes has nothing to prompt with and gets no detections.
    """
    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    counts = batch["num_boxes"].tolist()
    boxes = list(batch["boxes"].split(counts))
    labels = list(batch["class_labels"].split(counts))
    features = model.image_features(pixel_values, pixel_mask)
    padded, mask = pad_instances(boxes)
    encoded = model.encode_boxes(features, padded, mask)  # [B, P, d]
    classes = [torch.unique(lab).tolist() for lab in labels]
    width = max([1] + [len(c) for c in classes])
    embeddings = encoded.new_zeros(len(boxes), width, encoded.shape[-1])
    prompt_mask = torch.zeros(len(boxes), width, dtype=torch.bool, device=encoded.device)
    category_ids = torch.full((len(boxes), width), -1, dtype=torch.long, device=encoded.device)
    for b, present in enumerate(classes):
        for u, category in enumerate(present):
            embeddings[b, u] = encoded[b, : counts[b]][labels[b] == category].mean(0)
            prompt_mask[b, u] = True
            category_ids[b, u] = category
        if not present:  # a harmless placeholder prompt; its detections are dropped (id -1)
            embeddings[b, 0] = encoded[b, 0]
            prompt_mask[b, 0] = True
    out = model(pixel_values, pixel_mask, model.visual_prompts(embeddings, prompt_mask),
                features=features)
    scores = out.pred_logits.sigmoid().masked_fill(~prompt_mask[:, None, :], 0.0)
    return top_detections(scores, out.pred_boxes, category_ids, batch["image_ids"].tolist(),
                          batch["orig_sizes"], top_k)


def ground_truth_of(rows: dict, index: int) -> tuple[dict, list[dict]]:
    """(COCO image entry, annotations) of one decoded row, in original-image pixels."""
    height, width = (int(v) for v in rows["orig_size"][index])
    image = {"id": int(rows["image_id"][index]), "height": height, "width": width,
             **json.loads(str(rows["extras"][index]) or "{}")}
    boxes = np.asarray(rows["boxes"][index], np.float64).reshape(-1, 4)
    xywh = np.stack([(boxes[:, 0] - boxes[:, 2] / 2) * width, (boxes[:, 1] - boxes[:, 3] / 2)
                     * height, boxes[:, 2] * width, boxes[:, 3] * height], -1)
    annotations = [{"image_id": image["id"], "category_id": int(c),
                    "bbox": [round(float(v), 3) for v in box], "area": float(box[2] * box[3]),
                    "iscrowd": 0}
                   for c, box in zip(np.asarray(rows["labels"][index]).tolist(), xywh)]
    return image, annotations


class BatchPredictor:
    """Ray Data ``map_batches`` callable (an actor: the model is loaded once).

    Args:
        model_source: what :meth:`DinoR1.from_pretrained` accepts.
        mode: one of :data:`PROMPT_MODES`.
        data: a :class:`~dinor1.config.DataConfig` as a dict (normalisation, padding).
        generic_prompts: path of saved :class:`GenericPrompts` (``generic`` mode).
        classes: {category id: name} (``text`` mode).
        top_k: detections kept per image; chunk_size: prompts per forward (``generic``).
        device: "cpu", "cuda" or "auto" (CUDA when the actor was given a GPU).

    Output columns per input row: ``image_id``, ``error`` (empty when used), ``detections``,
    ``image`` and ``annotations`` (JSON strings: results dicts, the COCO image entry, the
    ground truth this row carried), ``dropped_by_rule`` (int [R]) and ``clipped_boxes`` (the
    ground-truth boxes cleaning dropped or clipped, see :mod:`dinor1.data.quality`).
    """

    def __init__(self, model_source: str, mode: str, data: dict, *,
                 generic_prompts: str | None = None, classes: dict[int, str] | None = None,
                 top_k: int = 300, chunk_size: int = 80, device: str = "auto"):
        from dinor1.config import DataConfig
        from dinor1.data.pipeline import collate_fn
        from dinor1.model.dino_r1 import DinoR1

        if mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {mode!r}; choose one of {PROMPT_MODES}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.mode, self.top_k, self.chunk_size = mode, top_k, chunk_size
        self.model = DinoR1.from_pretrained(model_source).to(self.device).eval()
        self.collate = collate_fn(DataConfig.model_validate(data), train=False)
        self.prompts = GenericPrompts.load(generic_prompts) if mode == "generic" else None
        if mode == "text":
            from dinor1.model.text import load_tokenizer

            ids = sorted(classes or {})
            self.names, self.category_ids = [classes[i] for i in ids], ids
            self.tokenizer = load_tokenizer(model_source, self.model.config.text_config.vocab_size,
                                            self.names)

    def predict(self, batch: dict) -> list[list[dict]]:
        """Detections for a collated batch (tensors already on ``self.device``)."""
        if self.mode == "generic":
            return detect_generic(self.model, batch, self.prompts, top_k=self.top_k,
                                  chunk_size=self.chunk_size)
        if self.mode == "text":
            return detect_text(self.model, batch, self.tokenizer, self.names, self.category_ids,
                               top_k=self.top_k)
        return detect_interactive(self.model, batch, top_k=self.top_k)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.collate(rows)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        detections = iter(self.predict(batch)) if len(batch["image_ids"]) else iter(())
        out = {"image_id": [], "error": [], "detections": [], "image": [], "annotations": [],
               "dropped_by_rule": [], "clipped_boxes": []}
        for i, error in enumerate(str(e) for e in rows["error"]):
            image, annotations = ({}, []) if error else ground_truth_of(rows, i)
            out["image_id"].append(int(rows["image_id"][i]))
            out["error"].append(error)
            out["detections"].append(json.dumps([] if error else next(detections)))
            out["image"].append(json.dumps(image))
            out["annotations"].append(json.dumps(annotations))
            out["dropped_by_rule"].append(np.asarray(rows["dropped_by_rule"][i], np.int64))
            out["clipped_boxes"].append(int(rows["clipped_boxes"][i]))
        return {k: np.array(v) for k, v in out.items()}
