"""``dinor1 predict``: one image + prompt boxes (in it or in an exemplar image) or text -> a PNG
with the detections drawn and a JSON of boxes and scores."""

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


def predict_image(checkpoint: str, image_path: str, *, boxes: list[PromptBox] = (),
                  exemplar_path: str | None = None, text: str | None = None,
                  out_png: str | Path | None = None, out_json: str | Path | None = None,
                  threshold: float = 0.3, top_k: int = 100, short_side: int = 800,
                  max_size: int = 1333) -> dict:
    """Detect the prompted objects in ``image_path``; returns the JSON payload written."""
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
    kept = [d for d in detections if d["score"] >= threshold]
    payload = {"image": str(image_path), "checkpoint": source.path, "threshold": threshold,
               "prompts": {"text": text} if text else
               {"boxes": [{"box_xyxy": list(b.box), "label": b.label} for b in boxes],
                "exemplar": exemplar_path or str(image_path)},
               "detections": [{"label": names[d["category_id"]], "score": d["score"],
                               "box_xyxy": [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                                            d["bbox"][1] + d["bbox"][3]]} for d in kept]}
    stem = Path(image_path).with_suffix("")
    out_png = Path(out_png or f"{stem}_dinor1.png")
    out_json = Path(out_json or f"{stem}_dinor1.json")
    drawn = draw_detections(image, kept, dict(enumerate(names)), score_threshold=threshold)
    drawn.save(out_png)
    out_json.write_text(json.dumps(payload, indent=1))
    payload["files"] = [str(out_png), str(out_json)]
    return payload
