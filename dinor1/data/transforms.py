"""Per-sample decoding, run inside Ray Data (``Dataset.map``): bytes -> resized image + targets.

The expensive work (image decode, the large resize) happens here, in parallel Ray Data tasks;
the per-batch random scale, flip, normalisation and padding happen in the collate function on the
training worker (see :mod:`dinor1.data.collate`), where the epoch is known and randomness can be
seeded deterministically.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
from PIL import Image

from dinor1.data.quality import CLIPPED, DROP_RULES, drop_counts, skip_error
from dinor1.data_pipelines.annotations import clean_annotations


def resized_hw(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """DETR-style target size: the short side becomes ``short_side`` unless the long side would
    exceed ``max_size``, in which case the long side becomes ``max_size``."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def xywh_to_cxcywh_normalised(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """[N, 4] COCO xywh pixels -> [N, 4] cx, cy, w, h in [0, 1]."""
    out = np.empty_like(boxes, dtype=np.float32)
    out[:, 0] = (boxes[:, 0] + boxes[:, 2] / 2) / width
    out[:, 1] = (boxes[:, 1] + boxes[:, 3] / 2) / height
    out[:, 2] = boxes[:, 2] / width
    out[:, 3] = boxes[:, 3] / height
    return out


def _skipped(row: dict, error: str) -> dict:
    return {
        "key": row["__key__"],
        "url": row["__url__"],
        "error": error,
        "image": np.zeros((1, 1, 3), np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "image_id": np.int64(-1),
        "orig_size": np.zeros((2,), np.int64),
        "dropped_boxes": np.int64(0),
        "dropped_by_rule": np.zeros((len(DROP_RULES),), np.int64),
        "clipped_boxes": np.int64(0),
        "extras": "{}",
    }


def _image_id(meta) -> int:
    """The sample's ``image_id``, which must fit int64 (raises KeyError, TypeError, ValueError
    or OverflowError otherwise)."""
    image_id = int(meta["image_id"])
    if not -(2**63) <= image_id < 2**63:
        raise ValueError(f"image_id {image_id} does not fit int64")
    return image_id


# Per-image fields evaluation needs besides the boxes (LVIS's federated labels), carried through
# decoding as one JSON string column.
EXTRA_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


class DecodeSample:
    """Callable for ``Dataset.map_batches`` (numpy format): shard rows -> decoded rows.

    Batches rather than rows because Ray Data's per-row path costs more than the JPEG decode
    itself. Output columns, per row::

        key, url, error   str
        image             uint8 [H, W, 3], resized so the short side is ``short_side``
                          (long side at most ``max_size``)
        boxes             float32 [N, 4] normalised cx, cy, w, h
        labels            int64 [N] dataset category ids
        image_id          int64
        orig_size         int64 [2] (height, width) of the stored image
        dropped_boxes     int64 annotations dropped by the cleaning rules
        dropped_by_rule   int64 [R] the same by rule (``dinor1.data.quality.DROP_RULES``)
        clipped_boxes     int64 boxes clipped to the image (kept)
        extras            str   JSON of the sample's ``EXTRA_FIELDS`` (LVIS negatives etc.)

    A row that cannot be used gets ``error`` set (``"<kind>: <message>"`` naming the shard and
    key, see :mod:`dinor1.data.quality`) and placeholder arrays; the collate function skips and
    counts it.
    """

    def __init__(
        self,
        short_side: int,
        max_size: int,
        category_ids: list[int] | None = None,
        keep_crowd: bool = False,
    ):
        self.short_side, self.max_size = short_side, max_size
        self.category_ids = set(category_ids) if category_ids is not None else None
        self.keep_crowd = keep_crowd

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.columns([self.decode_row({k: v[i] for k, v in batch.items()})
                             for i in range(len(batch["__key__"]))])

    @staticmethod
    def columns(rows: list[dict]) -> dict[str, np.ndarray]:
        """Decoded rows -> the numpy batch (one array per column; arrays of varying shape in
        an object array) that Ray Data turns into a block."""
        out = {}
        for name in rows[0] if rows else ():
            column = [r[name] for r in rows]
            if isinstance(column[0], np.ndarray) and column[0].ndim > 0:
                ragged = np.empty(len(column), dtype=object)  # variable-shaped tensor column
                for i, value in enumerate(column):
                    ragged[i] = value
                out[name] = ragged
            else:
                out[name] = np.array(column)
        return out

    def decode_row(self, row: dict) -> dict:
        key, url = row["__key__"], row["__url__"]
        if row["error"]:
            return _skipped(row, row["error"])
        try:
            meta = json.loads(row["json"])
            anns = meta["annotations"]
            if not isinstance(anns, list):
                raise TypeError(f"annotations is {type(anns).__name__}, not a list")
            image_id = _image_id(meta)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            return _skipped(row, skip_error(
                "bad_json", f"sample {key!r} in {url}: bad annotation JSON ({reason})"))
        try:
            with Image.open(io.BytesIO(row["image"])) as img:
                img.load()  # decodes (a broken image raises here)
                if img.mode != "RGB":  # (convert copies even an RGB image: not needed then)
                    img = img.convert("RGB")
        except Exception as exc:  # PIL raises many types for bad bytes
            return _skipped(row, skip_error(
                "bad_image", f"sample {key!r} in {url}: image does not decode ({exc})"))
        width, height = img.size
        stats: Counter = Counter(invalid_box=sum(not isinstance(a, dict) for a in anns))
        anns = [a for a in anns if isinstance(a, dict)]
        valid_ids = self.category_ids
        if valid_ids is None:  # no manifest: every int id seen is a category
            valid_ids = {c for a in anns if _is_int64(c := a.get("category_id"))}
        anns = clean_annotations(anns, width, height, valid_ids, stats)
        if not self.keep_crowd:
            anns = [a for a in anns if not a["iscrowd"]]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        new_h, new_w = resized_hw(height, width, self.short_side, self.max_size)
        if (new_h, new_w) != (height, width):
            img = img.resize((new_w, new_h), Image.BILINEAR)
        dropped = np.array(drop_counts(stats), np.int64)
        return {
            "key": key,
            "url": url,
            "error": "",
            "image": np.asarray(img, dtype=np.uint8),
            "boxes": xywh_to_cxcywh_normalised(boxes, width, height),
            "labels": np.array([a["category_id"] for a in anns], np.int64),
            "image_id": np.int64(image_id),
            "orig_size": np.array([height, width], np.int64),
            "dropped_boxes": np.int64(dropped.sum()),
            "dropped_by_rule": dropped,
            "clipped_boxes": np.int64(stats[CLIPPED]),
            "extras": json.dumps({k: meta[k] for k in EXTRA_FIELDS if k in meta}),
        }


def _is_int64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
