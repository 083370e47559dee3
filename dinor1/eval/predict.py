"""``dinor1 predict``: one image + prompt boxes (in it or in an exemplar image) or text -> a PNG
with the detections drawn and a JSON of boxes and scores.

Defaults that suit the models this project trains:

- the image is resized as the run's evaluation resized it (``data.eval_short_side`` and
  ``eval_max_size`` of the run folder's ``resolved_config.yaml``; 800/1333, Grounding DINO's,
  for other checkpoints). The demo's model, trained at 96-128 px, scored a correct box ~0.07
  at 800 px and ~0.3-0.45 at its own 128.
- kept: the best ``per_prompt`` boxes of each prompt (class) that score at least half the
  prompt's best, a box repeating a better kept one of the same prompt (IoU > 0.5, or 3/4 of
  it inside) left out as its duplicate; every one with its score. A fixed score threshold only suits a model whose
  scores are calibrated (the old default, 0.3, showed nothing for the demo's model);
  ``threshold`` keeps every box scoring at least that instead."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinor1.errors import UserError


@dataclass
class PromptBox:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 pixels of the exemplar image
    label: str


def parse_box(text: str) -> PromptBox:
    """``x0,y0,x1,y1`` or ``x0,y0,x1,y1:label`` (pixels)."""
    coords, _, label = text.partition(":")
    try:
        values = tuple(float(v) for v in coords.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"--box {text!r}: expected x0,y0,x1,y1[:label] in pixels")
    return PromptBox(values, label.strip() or "object")


def load_image(path: str | Path, what: str = "--image") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path} not found")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{what}: {path} is not a readable image ({exc})") from exc


def check_boxes(boxes: list[PromptBox], image: np.ndarray, path: str) -> None:
    height, width = image.shape[:2]
    for i, prompt in enumerate(boxes, 1):
        x0, y0, x1, y1 = prompt.box
        if not (x1 > x0 and y1 > y0):
            raise UserError(f"--box {i} {prompt.box}: needs x1 > x0 and y1 > y0")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise UserError(f"--box {i} {prompt.box} lies outside {path} ({width}x{height})")


def _batch(image: np.ndarray, short_side: int, max_size: int) -> dict[str, torch.Tensor]:
    """One image -> a collated eval batch (the same resize and normalisation as ``eval``)."""
    from PIL import Image

    from dinor1.data.collate import DetectionCollateFn
    from dinor1.data.transforms import resized_hw

    height, width = image.shape[:2]
    new_h, new_w = resized_hw(height, width, short_side, max_size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    rows = {"error": np.array([""]), "key": np.array(["image"]), "image": [resized],
            "boxes": [np.zeros((0, 4), np.float32)], "labels": [np.zeros(0, np.int64)],
            "image_id": np.array([0]), "orig_size": np.array([[height, width]]),
            "dropped_boxes": np.array([0])}
    return DetectionCollateFn(train=False)(rows)


PER_PROMPT = 5  # boxes kept per prompt by default
DUPLICATE_IOU = 0.5
DUPLICATE_INSIDE = 0.75  # of a box's area inside a better one: a part of the same object
MIN_RELATIVE = 0.5  # of the prompt's best score
DEFAULT_RESOLUTION = (800, 1333)  # short side, max size: Grounding DINO's


def duplicate(box: list[float], better: list[float]) -> bool:
    """Whether x, y, w, h ``box`` repeats ``better``: IoU above :data:`DUPLICATE_IOU`, or more
    than :data:`DUPLICATE_INSIDE` of it inside ``better`` (a part of the same object)."""
    width = min(box[0] + box[2], better[0] + better[2]) - max(box[0], better[0])
    height = min(box[1] + box[3], better[1] + better[3]) - max(box[1], better[1])
    inter = max(0.0, width) * max(0.0, height)
    area = box[2] * box[3]
    union = area + better[2] * better[3] - inter
    return (union > 0 and inter / union > DUPLICATE_IOU) or (area > 0
                                                            and inter / area > DUPLICATE_INSIDE)


def best_per_prompt(detections: list[dict], per_prompt: int, *,
                    min_relative: float = MIN_RELATIVE) -> list[dict]:
    """The ``per_prompt`` best-scoring detections of each ``category_id`` that score at least
    ``min_relative`` times its best, leaving out a :func:`duplicate` of a better kept one of
    the same prompt; best first."""
    kept: dict[int, list[dict]] = {}
    for det in sorted(detections, key=lambda d: -d["score"]):
        chosen = kept.setdefault(det["category_id"], [])
        if len(chosen) >= per_prompt or (chosen and det["score"] < min_relative
                                         * chosen[0]["score"]):
            continue
        if not any(duplicate(det["bbox"], c["bbox"]) for c in chosen):
            chosen.append(det)
    return sorted((d for chosen in kept.values() for d in chosen), key=lambda d: -d["score"])


def run_resolution(model_path: str) -> tuple[int, int] | None:
    """(short side, max size) the run that trained ``model_path`` (``<run>/final_model``)
    evaluated at, from ``<run>/resolved_config.yaml``; None when there is none."""
    import yaml

    from dinor1 import storage

    path = storage.join(str(model_path).rstrip("/").rsplit("/", 1)[0], "resolved_config.yaml")
    try:
        data = (yaml.safe_load(storage.read_text(path)) or {}).get("data", {})
        return int(data["eval_short_side"]), int(data["eval_max_size"])
    except Exception:  # noqa: BLE001 - no run folder, or not one of ours: the general default
        return None


def predict_image(checkpoint: str, image_path: str, *, boxes: list[PromptBox] = (),
                  exemplar_path: str | None = None, text: str | None = None,
                  out_png: str | Path | None = None, out_json: str | Path | None = None,
                  threshold: float | None = None, per_prompt: int = PER_PROMPT,
                  top_k: int = 100, short_side: int | None = None,
                  max_size: int | None = None) -> dict:
    """Detect the prompted objects in ``image_path``; returns the JSON payload written.

    Kept: every detection scoring at least ``threshold`` when it is given, else the best
    ``per_prompt`` of each prompt without duplicates (:func:`best_per_prompt`); both among the
    ``top_k`` best (query, prompt) pairs of the image. ``short_side``/``max_size`` default to
    the training run's evaluation resolution (:func:`run_resolution`), else 800/1333."""
    if per_prompt < 1:
        raise UserError(f"--per-prompt {per_prompt}: keep at least 1 box per prompt")
    from dinor1.eval.evaluate import load_model, resolve_checkpoint
    from dinor1.eval.inference import detect_generic, detect_text
    from dinor1.eval.report import draw_detections
    from dinor1.model.prompts import GenericPrompts

    if bool(boxes) == bool(text):
        raise UserError("give prompt boxes (--box) or --text, not both and not neither")
    if text is not None and not [n for n in text.split(".") if n.strip()]:
        raise UserError("--text has no class names (separate names with '.')")
    image = load_image(image_path)
    source = resolve_checkpoint(checkpoint)
    model = load_model(source)
    default_short, default_max = run_resolution(source.path) or DEFAULT_RESOLUTION
    short_side, max_size = short_side or default_short, max_size or default_max
    batch = _batch(image, short_side, max_size)
    if text is not None:
        from dinor1.model.text import load_tokenizer

        names = [n.strip() for n in text.split(".") if n.strip()]
        from dinor1 import storage

        local = storage.local_copy(source.path) if storage.is_uri(source.path) else source.path
        tokenizer = load_tokenizer(str(local), model.config.text_config.vocab_size, names)
        detections = detect_text(model, batch, tokenizer, names, list(range(len(names))),
                                 top_k=top_k)[0]
    else:
        exemplar = load_image(exemplar_path, "--exemplar") if exemplar_path else image
        check_boxes(list(boxes), exemplar, exemplar_path or image_path)
        names = list(dict.fromkeys(b.label for b in boxes))
        source_batch = _batch(exemplar, short_side, max_size) if exemplar_path else batch
        height, width = exemplar.shape[:2]
        normalised = torch.tensor([[((x0 + x1) / 2) / width, ((y0 + y1) / 2) / height,
                                    (x1 - x0) / width, (y1 - y0) / height]
                                   for x0, y0, x1, y1 in (b.box for b in boxes)])
        with torch.inference_mode():
            features = model.image_features(source_batch["pixel_values"],
                                            source_batch["pixel_mask"])
            encoded = model.encode_boxes(features, normalised[None])[0]  # [P, d]
        labels = torch.tensor([names.index(b.label) for b in boxes])
        embeddings = torch.stack([encoded[labels == i].mean(0) for i in range(len(names))])
        prompts = GenericPrompts(embeddings, list(range(len(names))), names,
                                 [int((labels == i).sum()) for i in range(len(names))])
        detections = detect_generic(model, batch, prompts, top_k=top_k)[0]
    if threshold is None:
        kept = best_per_prompt(detections, per_prompt)
    else:
        kept = [d for d in detections if d["score"] >= threshold]
    payload = {"image": str(image_path), "checkpoint": source.path, "threshold": threshold,
               "per_prompt": None if threshold is not None else per_prompt,
               "resolution": {"short_side": short_side, "max_size": max_size},
               "prompts": {"text": text} if text else
               {"boxes": [{"box_xyxy": list(b.box), "label": b.label} for b in boxes],
                "exemplar": exemplar_path or str(image_path)},
               "detections": [{"label": names[d["category_id"]], "score": d["score"],
                               "box_xyxy": [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                                            d["bbox"][1] + d["bbox"][3]]} for d in kept]}
    stem = Path(image_path).with_suffix("")
    out_png = Path(out_png or f"{stem}_dinor1.png")
    out_json = Path(out_json or f"{stem}_dinor1.json")
    drawn = draw_detections(image, kept, dict(enumerate(names)), score_threshold=0.0)
    drawn.save(out_png)
    out_json.write_text(json.dumps(payload, indent=1))
    payload["files"] = [str(out_png), str(out_json)]
    return payload
