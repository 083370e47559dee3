"""LVIS v1 JSON -> :class:`ConversionSource`, keeping what LVIS evaluation needs.

LVIS v1 images carry ``coco_url`` instead of ``file_name`` (their pixels are COCO 2017's); the
relative path is taken from the URL's last two parts (``train2017/000000391895.jpg``), so
``images`` is the COCO root holding ``train2017/`` and ``val2017/``. Per-image
``neg_category_ids`` and ``not_exhaustive_category_ids`` go into each sample's JSON and the
category ``frequency`` (r/c/f) into the manifest's ``category_attributes``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dinor1.data_pipelines.converters.coco import coco_records, read_json
from dinor1.data_pipelines.shard_writer import ConversionSource

LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


def lvis_file_name(image: dict) -> str:
    if image.get("file_name"):
        return image["file_name"]
    url = image.get("coco_url", "")
    parts = url.rstrip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"LVIS image {image.get('id')} has neither file_name nor coco_url")
    return "/".join(parts[-2:])


def load_lvis(
    annotations: str | Path, images: str | Path, *, split: str | None = None
) -> ConversionSource:
    data = read_json(annotations)
    stats: Counter = Counter()
    records = coco_records(
        data, Path(images), stats, file_name_of=lvis_file_name, extra_fields=LVIS_IMAGE_FIELDS
    )
    for record in records:
        for field in LVIS_IMAGE_FIELDS:
            record.extra.setdefault(field, [])
    categories = [
        {"id": c["id"], "name": c["name"], "frequency": c.get("frequency")}
        for c in data["categories"]
    ]
    return ConversionSource(
        dataset="lvis",
        split=split or Path(annotations).stem.removeprefix("lvis_v1_"),
        categories=categories,
        records=records,
        source_paths=[str(Path(annotations).resolve()), str(Path(images).resolve())],
        stats=stats,
    )
