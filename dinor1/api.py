"""The Python API: a trained DINO-R1 as a detector (what ``dinor1 predict`` and ``dinor1 serve``
run)::

    from dinor1 import Detector

    detector = Detector.from_pretrained("runs/demo")  # a run folder, a model directory, a
    #   preset, a hub name, or a registered model: "models:/NAME/3", "models:/NAME@champion"
    detector("photo.jpg", boxes=[(12, 20, 80, 70, "cat")])      # boxes drawn on the image
    detector("photo.jpg", boxes=[(5, 5, 40, 40, "cat")], exemplar="cat.jpg")  # on another
    detector("photo.jpg", text="cat . dog")                     # class names
    detector("photo.jpg", prompts="generic_prompts.safetensors")  # one prompt per class

Each call returns the detections kept, best first, as dicts: ``label``, ``category_id`` (the
prompt's index: the order of the labels as first given, of the text's names, or the generic
prompts' category ids), ``score``, ``bbox`` (COCO: x, y, width, height in pixels of the image)
and ``box_xyxy``. Kept: the best ``per_prompt`` boxes of each prompt scoring at least half its
best, without duplicates (:func:`best_per_prompt`), or every box scoring at least
``threshold`` when it is given.

:meth:`Detector.detect_many` runs many requests at once: the images of one size (after resizing)
share one backbone pass and one decoder pass for all their visual prompts (each image with its
own prompts, padded and masked); text requests are grouped by size and class names. Each
request gets exactly what it gets alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinor1.errors import UserError

PER_PROMPT = 5  # boxes kept per prompt by default
DEFAULT_RESOLUTION = (800, 1333)  # short side, max size: Grounding DINO's
CHUNK = 80  # prompts per decoder pass


class TooLarge(UserError):
    """An image (or a request) over the size limit."""


@dataclass
class PromptBox:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 pixels of the exemplar image
    label: str = "object"


@dataclass
class Request:
    """One image and its prompts, checked (:meth:`Detector.request`)."""

    image: np.ndarray  # uint8 [H, W, 3]
    boxes: list[PromptBox] = field(default_factory=list)
    exemplar: np.ndarray | None = None  # the image the boxes are drawn on, if not ``image``
    text: list[str] | None = None  # class names
    prompts: object | None = None  # GenericPrompts
    threshold: float | None = None
    per_prompt: int = PER_PROMPT
    top_k: int = 100

    @property
    def names(self) -> list[str]:
        if self.text is not None:
            return self.text
        if self.prompts is not None:
            return list(self.prompts.names)
        return list(dict.fromkeys(b.label for b in self.boxes))


def parse_box(value, index: int = 1) -> PromptBox:
    """``x0,y0,x1,y1[:label]`` (a string), ``(x0, y0, x1, y1[, label])``, a
    :class:`PromptBox`, or ``{"box": [x0, y0, x1, y1], "label": ...}``; pixels."""
    if isinstance(value, PromptBox):
        return value
    label = "object"
    if isinstance(value, str):
        coords, _, label = value.partition(":")
        parts: list = coords.split(",")
    elif isinstance(value, dict):
        parts, label = list(value.get("box") or value.get("box_xyxy") or []), value.get(
            "label", "object")
    elif isinstance(value, (list, tuple)):
        parts = list(value[:4])
        label = value[4] if len(value) == 5 else label
        if len(value) not in (4, 5):
            parts = []
    else:
        parts = []
    try:
        box = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise UserError(f"box {index} {value!r}: expected x0,y0,x1,y1[:label] in pixels")
    return PromptBox(box, str(label).strip() or "object")


def read_image(value, what: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """A path, encoded bytes, a PIL image or an array -> uint8 RGB [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, np.ndarray):
        array = value
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
            raise UserError(f"{what}: expected a uint8 array [H, W, 3], got {array.dtype} "
                            f"{list(value.shape)}")
        array = array[..., :3]
    else:
        if isinstance(value, Image.Image):
            image = value
        else:
            if isinstance(value, (bytes, bytearray, memoryview)):
                source, name = io.BytesIO(bytes(value)), what
            else:
                path = Path(value)
                if not path.is_file():
                    raise UserError(f"{what}: {path} not found")
                source, name = path, f"{what} {path}"
            try:
                image = Image.open(source)
                if max_pixels and image.width * image.height > max_pixels:
                    raise TooLarge(f"{name}: {image.width}x{image.height} is too large (at most "
                                    f"{max_pixels} pixels)")
                image.load()
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError,
                    ValueError) as exc:
                raise UserError(f"{name} is not a readable image ({exc})") from exc
        array = np.asarray(image.convert("RGB"))
    if array.shape[0] < 2 or array.shape[1] < 2:
        raise UserError(f"{what}: {array.shape[1]}x{array.shape[0]} is too small")
    if max_pixels and array.shape[0] * array.shape[1] > max_pixels:
        raise TooLarge(f"{what}: {array.shape[1]}x{array.shape[0]} is too large (at most "
                        f"{max_pixels} pixels)")
    return np.ascontiguousarray(array)


def check_boxes(boxes: list[PromptBox], image: np.ndarray, what: str,
                flag: str = "box") -> None:
    """Each box has x1 > x0, y1 > y0 and lies inside ``image`` (``what`` names it in the
    error, ``flag`` names the boxes: ``box``, or ``--box`` for the CLI)."""
    height, width = image.shape[:2]
    for i, prompt in enumerate(boxes, 1):
        x0, y0, x1, y1 = prompt.box
        if not (x1 > x0 and y1 > y0):
            raise UserError(f"{flag} {i} {list(prompt.box)}: needs x1 > x0 and y1 > y0")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise UserError(f"{flag} {i} {list(prompt.box)} lies outside {what} "
                            f"({width}x{height})")


def text_names(text) -> list[str]:
    """``"cat . dog"`` or ``["cat", "dog"]`` -> the class names."""
    if not isinstance(text, (str, list, tuple)):
        raise UserError(f"text: {text!r} is not class names (\"cat . dog\" or a list)")
    names = [n.strip() for n in (text.split(".") if isinstance(text, str) else text)
             if isinstance(n, str) and n.strip()]
    if not names:
        raise UserError("text has no class names (separate names with '.')")
    return list(dict.fromkeys(names))


class Detector:
    """A DINO-R1 model on a device, with the resolution it detects at."""

    def __init__(self, model, *, source: str = "", short_side: int = DEFAULT_RESOLUTION[0],
                 max_size: int = DEFAULT_RESOLUTION[1], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.source, self.short_side, self.max_size = source, short_side, max_size
        self._tokenizers: dict[tuple[str, ...], object] = {}

    @classmethod
    def from_pretrained(cls, checkpoint: str, *, device: str = "auto",
                        short_side: int | None = None, max_size: int | None = None,
                        tracking_uri: str | None = None) -> Detector:
        """Load ``checkpoint``: anything ``dinor1 eval`` takes, including ``models:/NAME/VERSION``
        and ``models:/NAME@ALIAS`` (from ``tracking_uri``, default MLflow's own:
        ``MLFLOW_TRACKING_URI``). The resolution defaults to the training run's evaluation
        resolution, else 800/1333."""
        from dinor1.eval.evaluate import load_model, resolve_checkpoint

        source = resolve_checkpoint(checkpoint, tracking_uri)
        default_short, default_max = run_resolution(source.path) or DEFAULT_RESOLUTION
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(load_model(source), source=source.path, short_side=short_side or default_short,
                   max_size=max_size or default_max, device=device)

    # ---- requests

    def request(self, image, *, boxes=None, exemplar=None, text=None, prompts=None,
                threshold: float | None = None, per_prompt: int = PER_PROMPT,
                top_k: int = 100, max_pixels: int | None = None) -> Request:
        """Check one image and its prompts (one prompt mode: ``boxes`` [with ``exemplar``],
        ``text`` or ``prompts``); a :class:`UserError` names what is wrong."""
        from dinor1.model.prompts import GenericPrompts

        modes = [m for m, v in (("boxes", boxes), ("text", text), ("prompts", prompts))
                 if v is not None and (not isinstance(v, (list, tuple)) or len(v))]
        if len(modes) != 1:
            got = f"; got {' and '.join(modes)}" if modes else ""
            raise UserError("give one prompt mode: boxes (on the image or an exemplar), text or "
                            f"prompts{got}")
        if exemplar is not None and boxes is None:
            raise UserError("an exemplar image needs boxes drawn on it")
        if per_prompt < 1:
            raise UserError(f"per_prompt {per_prompt}: keep at least 1 box per prompt")
        if top_k < 1:
            raise UserError(f"top_k {top_k}: keep at least 1 box")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UserError(f"threshold {threshold}: a score between 0 and 1")
        request = Request(read_image(image, "image", max_pixels), threshold=threshold,
                          per_prompt=per_prompt, top_k=top_k)
        if boxes is not None:
            request.boxes = [parse_box(b, i) for i, b in enumerate(boxes, 1)]
            if exemplar is not None:
                request.exemplar = read_image(exemplar, "exemplar", max_pixels)
            check_boxes(request.boxes, request.image if exemplar is None else request.exemplar,
                        "the image" if exemplar is None else "the exemplar")
        elif text is not None:
            request.text = text_names(text)
        else:
            request.prompts = prompts if isinstance(prompts, GenericPrompts) else \
                _load_prompts(prompts)
        return request

    def __call__(self, image, **kwargs) -> list[dict]:
        """Detections in one image (keyword arguments: :meth:`request`'s)."""
        return self.detect_many([self.request(image, **kwargs)])[0]

    # ---- detection

    @torch.inference_mode()
    def detect_many(self, requests: list[Request]) -> list[list[dict]]:
        """Detections for each request, in order, each exactly what it gets alone: requests
        whose images have the same size after resizing share the passes (text requests: also
        the same class names). Images of other sizes are not batched together: padding one to
        the other's size changes a DETR-style detector's output."""
        from dinor1.data.transforms import resized_hw

        results: list[list[dict] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            size = resized_hw(*request.image.shape[:2], self.short_side, self.max_size)
            key = (size, tuple(request.text) if request.text is not None else None)
            groups.setdefault(key, []).append(i)
        for (_, names), indices in groups.items():
            group = [requests[i] for i in indices]
            found = self._detect_text(group, list(names)) if names is not None else \
                self._detect_visual(group)
            for i, detections in zip(indices, found):
                results[i] = detections
        return [self._kept(request, found) for request, found in zip(requests, results)]

    def _batch(self, images: list[np.ndarray]) -> dict:
        """Images -> a collated eval batch on the device (resized as ``eval`` resizes)."""
        from PIL import Image

        from dinor1.data.collate import DetectionCollateFn
        from dinor1.data.transforms import resized_hw

        resized = []
        for image in images:
            new_h, new_w = resized_hw(*image.shape[:2], self.short_side, self.max_size)
            resized.append(np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                                    Image.BILINEAR)))
        count = len(images)
        rows = {"error": np.array([""] * count), "key": np.array([f"image{i}" for i in
                                                                  range(count)]),
                "image": resized, "boxes": [np.zeros((0, 4), np.float32)] * count,
                "labels": [np.zeros(0, np.int64)] * count, "image_id": np.arange(count),
                "orig_size": np.array([image.shape[:2] for image in images]),
                "dropped_boxes": np.zeros(count, np.int64)}
        batch = DetectionCollateFn(train=False)(rows)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _normalised(self, boxes: list[PromptBox], image: np.ndarray) -> torch.Tensor:
        height, width = image.shape[:2]
        return torch.tensor([[((x0 + x1) / 2) / width, ((y0 + y1) / 2) / height,
                              (x1 - x0) / width, (y1 - y0) / height]
                             for x0, y0, x1, y1 in (b.box for b in boxes)],
                            dtype=torch.float32, device=self.device)

    @staticmethod
    def _per_label(encoded: torch.Tensor, boxes: list[PromptBox]) -> torch.Tensor:
        """Box prompt embeddings [P, d] -> one averaged prompt per label [U, d]."""
        names = list(dict.fromkeys(b.label for b in boxes))
        labels = torch.tensor([names.index(b.label) for b in boxes], device=encoded.device)
        return torch.stack([encoded[labels == u].mean(0) for u in range(len(names))])

    def _detect_visual(self, requests: list[Request]) -> list[list[dict]]:
        from dinor1.eval.inference import _merge_chunks, top_detections
        from dinor1.model.prompts import pad_instances

        model = self.model
        batch = self._batch([r.image for r in requests])
        pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
        features = model.image_features(pixel_values, pixel_mask)
        own = [bool(r.boxes) and r.exemplar is None for r in requests]
        encoded = None
        if any(own):  # boxes on their own image: one prompt-encoder pass for the batch
            padded, mask = pad_instances([
                self._normalised(r.boxes, r.image) if mine else
                torch.zeros(0, 4, device=self.device) for r, mine in zip(requests, own)])
            encoded = model.encode_boxes(features, padded, mask)
        embeddings = []
        for b, request in enumerate(requests):
            if own[b]:
                embeddings.append(self._per_label(encoded[b, :len(request.boxes)],
                                                  request.boxes))
            elif request.boxes:  # on an exemplar image
                exemplar = self._batch([request.exemplar])
                found = model.encode_boxes(
                    model.image_features(exemplar["pixel_values"], exemplar["pixel_mask"]),
                    self._normalised(request.boxes, request.exemplar)[None])[0]
                embeddings.append(self._per_label(found, request.boxes))
            else:
                embeddings.append(request.prompts.embeddings.to(self.device,
                                                                pixel_values.dtype))
        width = max(len(e) for e in embeddings)
        prompts = pixel_values.new_zeros(len(requests), width, embeddings[0].shape[-1])
        real = torch.zeros(len(requests), width, dtype=torch.bool, device=self.device)
        for b, found in enumerate(embeddings):
            prompts[b, :len(found)], real[b, :len(found)] = found, True
        columns = torch.arange(width, device=self.device)[None].expand(len(requests), -1)
        category_ids = torch.where(real, columns, torch.full_like(columns, -1))
        chunks = []
        for start in range(0, width, CHUNK):
            part, used = prompts[:, start:start + CHUNK], real[:, start:start + CHUNK]
            # an image without prompts in this chunk attends to a placeholder (scored 0)
            attend = used.clone()
            attend[:, 0] |= ~used.any(1)
            out = model(pixel_values, pixel_mask, model.visual_prompts(part, attend),
                        features=features)
            chunks.append((out.pred_logits.sigmoid().masked_fill(~used[:, None, :], 0.0),
                           out.pred_boxes, category_ids[:, start:start + CHUNK]))
        scores, boxes, ids = _merge_chunks(chunks)
        return top_detections(scores, boxes, ids, list(range(len(requests))),
                              batch["orig_sizes"], max(r.top_k for r in requests))

    def _tokenizer(self, names: list[str]):
        from dinor1 import storage
        from dinor1.model.text import load_tokenizer

        key = tuple(names)
        if key not in self._tokenizers:
            local = storage.local_copy(self.source) if storage.is_uri(self.source) else \
                self.source
            if len(self._tokenizers) > 64:
                self._tokenizers.clear()
            self._tokenizers[key] = load_tokenizer(str(local) if local else None,
                                                   self.model.config.text_config.vocab_size,
                                                   names)
        return self._tokenizers[key]

    def _detect_text(self, requests: list[Request], names: list[str]) -> list[list[dict]]:
        from dinor1.eval.inference import detect_text

        batch = self._batch([r.image for r in requests])
        return detect_text(self.model, batch, self._tokenizer(names), names,
                           list(range(len(names))), top_k=max(r.top_k for r in requests))

    @staticmethod
    def _kept(request: Request, found: list[dict]) -> list[dict]:
        found = found[:request.top_k]
        if request.threshold is None:
            kept = best_per_prompt(found, request.per_prompt)
        else:
            kept = [d for d in found if d["score"] >= request.threshold]
        names = request.names
        ids = list(request.prompts.category_ids) if request.prompts is not None else None
        out = []
        for d in kept:
            x, y, w, h = d["bbox"]
            index = d["category_id"]
            out.append({"label": names[index],
                        "category_id": ids[index] if ids is not None else index,
                        "score": d["score"], "bbox": [x, y, w, h],
                        "box_xyxy": [x, y, round(x + w, 2), round(y + h, 2)]})
        return out


JSON_KEYS = ("image", "boxes", "exemplar", "text", "prompts", "threshold", "per_prompt",
             "top_k")


def decode_base64(value, key: str) -> bytes:
    import base64
    import binascii

    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise UserError(f"{key}: expected the image file's bytes in base64")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value,
                                validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"{key}: not valid base64 ({exc})") from exc


def request_from_json(detector: Detector, payload: dict, *, generic=None,
                      max_pixels: int | None = None) -> Request:
    """A JSON request (the HTTP endpoint's and the MLflow model's) -> a :class:`Request`:
    ``image`` (base64 of the file), one of ``boxes`` (``[[x0, y0, x1, y1], ...]``, each
    optionally ``{"box": [...], "label": ...}`` or ``"x0,y0,x1,y1:label"``; with ``exemplar``,
    base64, when they are drawn on another image), ``text`` (``"cat . dog"`` or a list) or
    ``prompts: "generic"`` (the model's saved generic prompts); ``threshold``, ``per_prompt``,
    ``top_k`` optional."""
    if not isinstance(payload, dict):
        raise UserError("the request must be a JSON object")
    unknown = sorted(set(payload) - set(JSON_KEYS))
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} (known: {', '.join(JSON_KEYS)})")
    if "image" not in payload:
        raise UserError("image: missing (the image file's bytes in base64)")
    prompts = payload.get("prompts")
    if prompts is not None:
        if prompts != "generic":
            raise UserError(f"prompts: {prompts!r} is not a prompt mode (\"generic\": the "
                            "model's saved prompts; or give boxes or text)")
        if generic is None:
            raise UserError("prompts: this model has no saved generic prompts (give boxes or "
                            "text)")
        prompts = generic
    boxes = payload.get("boxes")
    if boxes is not None and not isinstance(boxes, list):
        raise UserError("boxes: expected a list of [x0, y0, x1, y1] boxes")
    options = {}
    for key, kind in (("threshold", (int, float)), ("per_prompt", int), ("top_k", int)):
        value = payload.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise UserError(f"{key}: {value!r} is not a number")
            options[key] = value
    exemplar = payload.get("exemplar")
    return detector.request(
        decode_base64(payload["image"], "image"), boxes=boxes,
        exemplar=None if exemplar is None else decode_base64(exemplar, "exemplar"),
        text=payload.get("text"), prompts=prompts, max_pixels=max_pixels, **options)


DUPLICATE_IOU = 0.5
DUPLICATE_INSIDE = 0.75  # of a box's area inside a better one: a part of the same object
MIN_RELATIVE = 0.5  # of the prompt's best score


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


def _load_prompts(path):
    from dinor1.model.prompts import GenericPrompts

    if not Path(str(path)).is_file():
        raise UserError(f"prompts: {path} not found (a generic prompts file, .safetensors)")
    try:
        return GenericPrompts.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
        raise UserError(f"prompts: {path} is not a generic prompts file ({exc})") from exc


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
