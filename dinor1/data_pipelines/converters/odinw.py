"""ODinW: a folder of many small COCO-format datasets -> one shard set per dataset and split.

ODinW as distributed for GLIP/Grounding DINO evaluation is a tree of Roboflow exports, e.g.
``odinw/AerialMaritimeDrone/large/train/_annotations.coco.json`` with the images beside the
JSON. Every annotation JSON found under the root becomes one :class:`ConversionSource` named by
its path: dataset ``AerialMaritimeDrone/large``, split ``train``; it is written to
``OUT/AerialMaritimeDrone/large/train/``.
"""

from __future__ import annotations

from pathlib import Path

from dinor1.data_pipelines.converters.coco import load_coco

ANNOTATION_NAMES = ("_annotations.coco.json", "annotations.json")


def find_odinw_datasets(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(output relative path, annotation file, image folder) for every dataset split under root.

    Splits are the folders holding an annotation file; the dataset name is the path from the root
    to the split's parent.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ODinW root not found: {root}")
    found = []
    for name in ANNOTATION_NAMES:
        for ann in sorted(root.rglob(name)):
            rel = ann.parent.relative_to(root)
            found.append((rel.as_posix(), ann, ann.parent))
    if not found:
        raise FileNotFoundError(f"no {' or '.join(ANNOTATION_NAMES)} under {root}")
    return found


def load_odinw_split(root: str | Path, rel: str, ann: Path, images: Path):
    parts = rel.split("/")
    dataset = "/".join(parts[:-1]) or parts[0]
    return load_coco(ann, images, split=parts[-1], dataset=f"odinw/{dataset}")
