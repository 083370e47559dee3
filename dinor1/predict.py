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
from pathlib import Path

from dinor1.api import PER_PROMPT, PromptBox, best_per_prompt  # noqa: F401 (re-exported)
from dinor1.errors import UserError


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


def predict_image(checkpoint: str, image_path: str, *, boxes: list[PromptBox] = (),
                  exemplar_path: str | None = None, text: str | None = None,
                  out_png: str | Path | None = None, out_json: str | Path | None = None,
                  threshold: float | None = None, per_prompt: int = PER_PROMPT,
                  top_k: int = 100, short_side: int | None = None,
                  max_size: int | None = None, device: str = "auto") -> dict:
    """Detect the prompted objects in ``image_path``; returns the JSON payload written.

    Kept: every detection scoring at least ``threshold`` when it is given, else the best
    ``per_prompt`` of each prompt without duplicates (``best_per_prompt``); both among the
    ``top_k`` best (query, prompt) pairs of the image. ``short_side``/``max_size`` default to
    the training run's evaluation resolution, else 800/1333 (:class:`dinor1.api.Detector`)."""
    from dinor1.api import Detector, check_boxes, read_image
    from dinor1.eval.report import draw_detections

    if per_prompt < 1:
        raise UserError(f"--per-prompt {per_prompt}: keep at least 1 box per prompt")
    if bool(boxes) == bool(text):
        raise UserError("give prompt boxes (--box) or --text, not both and not neither")
    if text is not None and not [n for n in text.split(".") if n.strip()]:
        raise UserError("--text has no class names (separate names with '.')")
    image = read_image(image_path, "--image")
    exemplar = read_image(exemplar_path, "--exemplar") if exemplar_path else None
    if boxes:  # (named as the CLI's flags and files)
        check_boxes(list(boxes), image if exemplar is None else exemplar,
                    str(exemplar_path or image_path), flag="--box")
    detector = Detector.from_pretrained(checkpoint, device=device, short_side=short_side,
                                        max_size=max_size)
    request = detector.request(image, boxes=list(boxes) or None, exemplar=exemplar, text=text,
                               threshold=threshold, per_prompt=per_prompt, top_k=top_k)
    kept = detector.detect_many([request])[0]
    names = request.names
    payload = {"image": str(image_path), "checkpoint": detector.source, "threshold": threshold,
               "per_prompt": None if threshold is not None else per_prompt,
               "resolution": {"short_side": detector.short_side, "max_size": detector.max_size},
               "prompts": {"text": text} if text else
               {"boxes": [{"box_xyxy": list(b.box), "label": b.label} for b in boxes],
                "exemplar": exemplar_path or str(image_path)},
               "detections": [{"label": d["label"], "score": d["score"],
                               "box_xyxy": d["box_xyxy"]} for d in kept]}
    stem = Path(image_path).with_suffix("")
    out_png = Path(out_png or f"{stem}_dinor1.png")
    out_json = Path(out_json or f"{stem}_dinor1.json")
    drawn = draw_detections(image, kept, dict(enumerate(names)), score_threshold=0.0)
    drawn.save(out_png)
    out_json.write_text(json.dumps(payload, indent=1))
    payload["files"] = [str(out_png), str(out_json)]
    return payload
