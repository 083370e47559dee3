"""ODVG JSONL (Open-GroundingDino / MM-Grounding-DINO training format) -> :class:`ConversionSource`.

Each line is one image::

    {"filename": "a.jpg", "height": 480, "width": 640,
     "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": 3, "category": "dog"}]}}
or  {"filename": ..., "grounding": {"caption": "a dog on a sofa",
     "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "a dog", "tokens_positive": [[0, 5]]}]}}

Detection records use the label map (``{"3": "dog", ...}``, a JSON file) as categories; when no
label map is given, categories come from the ``category`` names on the instances. Grounding
records get one category per distinct lower-cased phrase; the caption is kept in the sample JSON
and each annotation keeps its ``phrase``. Image ids are the 1-based line numbers. Boxes are
converted from xyxy to COCO xywh. Lines that are not valid JSON are counted as ``invalid_line``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dinor1.data_pipelines.shard_writer import ConversionSource, SourceRecord


def _xywh(box) -> list[float] | None:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    return [x1, y1, x2 - x1, y2 - y1]


def load_odvg(
    jsonl: str | Path,
    images: str | Path,
    *,
    label_map: str | Path | None = None,
    split: str = "train",
    dataset: str | None = None,
) -> ConversionSource:
    jsonl, images = Path(jsonl), Path(images)
    if not jsonl.is_file():
        raise FileNotFoundError(f"ODVG file not found: {jsonl}")
    names: dict[int, str] = {}
    if label_map is not None:
        names = {int(k): v for k, v in json.loads(Path(label_map).read_text()).items()}
    phrase_ids: dict[str, int] = {}
    stats: Counter = Counter()
    records = []
    next_ann_id = 0
    with jsonl.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                file_name = row["filename"]
            except (json.JSONDecodeError, KeyError, TypeError):
                stats["invalid_line"] += 1
                continue
            anns, extra = [], {}
            if "detection" in row:
                for inst in row["detection"].get("instances", []):
                    label = inst.get("label")
                    if label_map is None and isinstance(label, int) and "category" in inst:
                        names.setdefault(label, inst["category"])
                    anns.append({"bbox": _xywh(inst.get("bbox")), "category_id": label})
            elif "grounding" in row:
                extra["caption"] = row["grounding"].get("caption", "")
                for region in row["grounding"].get("regions", []):
                    phrase = str(region.get("phrase", "")).strip().lower()
                    cid = phrase_ids.setdefault(phrase, len(phrase_ids) + 1)
                    anns.append(
                        {"bbox": _xywh(region.get("bbox")), "category_id": cid, "phrase": phrase}
                    )
            for ann in anns:
                ann["id"] = next_ann_id = next_ann_id + 1
            records.append(
                SourceRecord(
                    image_id=line_no,
                    file_name=file_name,
                    path=str(images / file_name),
                    width=row.get("width"),
                    height=row.get("height"),
                    annotations=anns,
                    extra=extra,
                )
            )
    names.update({cid: phrase for phrase, cid in phrase_ids.items()})
    categories = [{"id": cid, "name": name} for cid, name in sorted(names.items())]
    sources = [str(jsonl.resolve()), str(images.resolve())]
    if label_map is not None:
        sources.append(str(Path(label_map).resolve()))
    return ConversionSource(
        dataset=dataset or jsonl.stem,
        split=split,
        categories=categories,
        records=records,
        source_paths=sources,
        stats=stats,
    )
