"""The on-disk shard format shared by every converter (writer side) and `dinor1.data` (reader side).

A shard set is a folder (or object-store prefix) holding

- ``shard-000000.tar``, ``shard-000001.tar``, ...: plain (uncompressed) tar files in WebDataset
  layout. Each sample is two adjacent members with the same key (a key never contains a dot):
  ``{key}.jpg`` or ``{key}.png`` (the original image bytes, not re-encoded) and ``{key}.json``::

      {"image_id": 42, "file_name": "train2017/000000000042.jpg", "width": 640, "height": 480,
       "annotations": [{"id": 7, "bbox": [x, y, w, h], "category_id": 18, "iscrowd": 0,
                        "area": 1234.5}, ...],
       ...dataset-specific extras (LVIS: neg_category_ids, not_exhaustive_category_ids;
          ODVG grounding: caption)}

  Boxes are COCO ``xywh`` in pixels of the stored image.
- ``manifest.json``: dataset, split, categories (id -> name), per-shard sample counts and
  sha256, source paths, converter version, and the counts of every skipped or repaired input.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

CONVERTER_VERSION = "1"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
# Members an image may be stored as. Anything else in a shard is ignored by readers, except
# pickled payloads, which readers refuse (never unpickle data from a shard).
IMAGE_EXTENSIONS = ("jpg", "png")
REFUSED_EXTENSIONS = ("pt", "pth", "pkl", "pickle", "npy", "npz")

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(image_id: int | str) -> str:
    """The shard key for an image id: zero-padded digits for ints, a dot-free slug for strings."""
    if isinstance(image_id, int):
        return f"{image_id:012d}"
    key = _KEY_SAFE.sub("_", str(image_id)).strip("_")
    if not key:
        raise ValueError(f"image id {image_id!r} gives an empty shard key")
    return key


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temporary sibling then rename, so readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False))
    os.replace(tmp, path)


def read_manifest(shard_dir: str | os.PathLike) -> dict | None:
    """The manifest of a local shard folder, or None when there is none."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
