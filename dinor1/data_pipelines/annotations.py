"""Cleaning rules for source annotations, shared by every converter.

Documented behaviour for bad input (each case is counted under the given name; the counts are
printed at the end of a conversion and stored in the manifest under ``"skipped"``):

============================  ===============================================================
``duplicate_image_id``        a second image entry with an id already seen: skipped
``orphan_annotation``         an annotation whose image id is not in the image list: dropped
``missing_image``             the image file does not exist: sample skipped
``unreadable_image``          the image bytes do not decode (truncated, not an image): skipped
``size_mismatch``             width/height in the JSON differ from the decoded image: the
                              decoded size is used and the sample kept
``unknown_category``          an annotation with a category id not in the category list:
                              dropped
``invalid_box``               a box that is not 4 finite numbers, or has width/height <= 0:
                              dropped
``clipped_box``               a box partly outside the image: clipped to the image and kept
``box_outside_image``         a box entirely outside the image (nothing left after clipping):
                              dropped
============================  ===============================================================

Images left with no annotations are kept (they are negatives for every prompt).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

SKIP_REASONS = (
    "duplicate_image_id",
    "orphan_annotation",
    "missing_image",
    "unreadable_image",
    "size_mismatch",
    "unknown_category",
    "invalid_box",
    "clipped_box",
    "box_outside_image",
)

# Annotation fields kept in the shard JSON; segmentation masks are dropped (not used by a box
# detector, and they dominate the size of COCO/LVIS annotation files).
_DROPPED_FIELDS = {"segmentation", "image_id", "bbox", "category_id", "iscrowd", "area"}


def clean_annotations(
    annotations: Iterable[dict],
    width: int,
    height: int,
    category_ids: set[int],
    stats: Counter,
) -> list[dict]:
    """Validate, clip and normalise one image's annotations.

    Args:
        annotations: COCO-style dicts with ``bbox`` = [x, y, w, h] in pixels.
        width, height: the decoded image size.
        category_ids: the dataset's valid category ids.
        stats: counter updated with the reasons listed in the module docstring.

    Returns:
        Clean annotations: ``id``, ``bbox`` (clipped, floats), ``category_id``, ``iscrowd``,
        ``area`` plus any extra scalar fields of the source (e.g. a grounding ``phrase``).
    """
    out = []
    for ann in annotations:
        if not _known_category(ann.get("category_id"), category_ids):
            stats["unknown_category"] += 1
            continue
        box = ann.get("bbox")
        try:
            if not isinstance(box, (list, tuple)):
                raise TypeError("bbox is not a list")
            x, y, w, h = (float(v) for v in box)
        except (TypeError, ValueError, OverflowError):
            stats["invalid_box"] += 1
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            stats["invalid_box"] += 1
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(width)), min(y + h, float(height))
        if x1 <= x0 or y1 <= y0:
            stats["box_outside_image"] += 1
            continue
        clipped = (x0, y0, x1 - x0, y1 - y0) != (x, y, w, h)
        if clipped:
            stats["clipped_box"] += 1
        cw, ch = x1 - x0, y1 - y0
        area, crowd = ann.get("area"), ann.get("iscrowd", 0)
        if clipped or not isinstance(area, (int, float)) or not math.isfinite(area) or area <= 0:
            area = cw * ch
        clean = {
            "id": ann.get("id"),
            "bbox": [x0, y0, cw, ch],
            "category_id": int(ann["category_id"]),
            "iscrowd": int(isinstance(crowd, (int, float)) and bool(crowd)),
            "area": float(area),
        }
        for key, value in ann.items():
            if key not in _DROPPED_FIELDS and key not in clean:
                clean[key] = value
        out.append(clean)
    return out


def _known_category(category_id, category_ids: set[int]) -> bool:
    try:
        return category_id in category_ids
    except TypeError:  # an unhashable id (a list, an object) from a malformed file
        return False
