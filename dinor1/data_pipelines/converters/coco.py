"""COCO instances JSON (and COCO-format Objects365) -> :class:`ConversionSource`."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from dinor1.data_pipelines.shard_writer import ConversionSource, SourceRecord


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or non-list key {key!r} (not a COCO instances file)")
    return data


def coco_records(
    data: dict,
    image_root: Path,
    stats: Counter,
    *,
    file_name_of: Callable[[dict], str] = lambda image: image["file_name"],
    extra_fields: tuple[str, ...] = (),
) -> list[SourceRecord]:
    """Group a COCO-style dict's annotations by image; counts duplicates and orphans.

    Args:
        data: parsed COCO-style JSON (``images``, ``annotations``).
        image_root: folder that ``file_name`` is relative to.
        stats: updated with ``duplicate_image_id`` and ``orphan_annotation``.
        file_name_of: how to get an image's relative path from its entry (LVIS differs).
        extra_fields: per-image fields copied into the shard JSON.
    """
    records: dict[int, SourceRecord] = {}
    for image in data["images"]:
        image_id = image.get("id")
        if not isinstance(image_id, int) or image_id in records:
            stats["duplicate_image_id" if image_id in records else "invalid_image_entry"] += 1
            continue
        file_name = file_name_of(image)
        records[image_id] = SourceRecord(
            image_id=image_id,
            file_name=file_name,
            path=str(image_root / file_name),
            width=image.get("width"),
            height=image.get("height"),
            extra={k: image[k] for k in extra_fields if k in image},
        )
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if ann.get("image_id") in records:
            by_image[ann["image_id"]].append(ann)
        else:
            stats["orphan_annotation"] += 1
    for image_id, anns in by_image.items():
        records[image_id].annotations = anns
    return list(records.values())


def load_coco(
    annotations: str | Path,
    images: str | Path,
    *,
    split: str | None = None,
    dataset: str = "coco",
) -> ConversionSource:
    """A COCO instances file and the folder its ``file_name`` entries are relative to.

    Args:
        annotations: e.g. ``annotations/instances_train2017.json``.
        images: e.g. ``train2017/``.
        split: split name for the manifest (default: derived from the JSON file name).
        dataset: dataset name for the manifest.
    """
    data = read_json(annotations)
    stats: Counter = Counter()
    records = coco_records(data, Path(images), stats)
    categories = [dict(c) for c in data["categories"]]
    return ConversionSource(
        dataset=dataset,
        split=split or Path(annotations).stem.removeprefix("instances_"),
        categories=categories,
        records=records,
        source_paths=[str(Path(annotations).resolve()), str(Path(images).resolve())],
        stats=stats,
    )


def load_objects365(
    annotations: str | Path, images: str | Path, *, split: str | None = None
) -> ConversionSource:
    """Objects365 v1/v2 in its COCO-format JSON (``file_name`` relative to ``images``)."""
    return load_coco(annotations, images, split=split, dataset="objects365")
