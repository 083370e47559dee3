"""CLI glue for the offline side: synthetic data, conversions, and the data-only demo."""

from __future__ import annotations

from pathlib import Path

from dinor1.data_pipelines import converters
from dinor1.data_pipelines.shard_writer import format_report, write_shards
from dinor1.errors import UserError

SPLITS = ("train", "val", "support")


def synthesize(out: str, *, samples_per_shard: int = 500, workers: int = 1, shards: bool = True,
               progress: bool = True, **knobs) -> dict[str, Path]:
    """Generate the synthetic dataset under ``out/coco`` and its shards under ``out/shards``.

    Returns {split: shard folder} (or {split: annotation JSON} with ``shards=False``).
    ``progress``: progress bars and a summary line per split.
    """
    from dinor1.data_pipelines.synthetic import SyntheticConfig, generate_synthetic_coco

    try:
        config = SyntheticConfig(**knobs)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    coco_dir = Path(out) / "coco"
    annotations = generate_synthetic_coco(coco_dir, config, num_workers=workers,
                                          progress=progress)
    if not shards:
        return annotations
    out_dirs = {}
    for split, ann in annotations.items():
        source = converters.load_coco(ann, coco_dir / "images" / split, split=split,
                                      dataset="synthetic")
        source.manifest_extra["novel_category_ids"] = [
            c["id"] for c in source.categories if c.get("novel")
        ]
        out_dirs[split] = Path(out) / "shards" / split
        manifest = write_shards(source, out_dirs[split], samples_per_shard=samples_per_shard,
                                num_workers=workers, progress=progress)
        if progress:
            print(format_report(manifest))
    return out_dirs


def convert(args) -> None:
    """``dinor1 data convert FORMAT ...`` (see ``dinor1 data convert --help``)."""

    def need(*names):
        for name in names:
            if getattr(args, name) is None:
                raise UserError(f"{args.format} conversion needs --{name.replace('_', '-')}")

    jobs = []
    if args.format in ("coco", "objects365", "lvis"):
        need("annotations", "images")
        load = {"coco": converters.load_coco, "objects365": converters.load_objects365,
                "lvis": converters.load_lvis}[args.format]
        jobs.append((load(args.annotations, args.images, split=args.split), Path(args.out)))
    elif args.format == "odvg":
        need("annotations", "images")
        jobs.append((converters.load_odvg(args.annotations, args.images, label_map=args.label_map,
                                          split=args.split or "train"), Path(args.out)))
    else:
        need("root")
        from dinor1.data_pipelines.converters.odinw import load_odinw_split

        for rel, ann, images in converters.find_odinw_datasets(args.root):
            jobs.append((load_odinw_split(args.root, rel, ann, images), Path(args.out) / rel))
    for source, out in jobs:
        manifest = write_shards(source, out, samples_per_shard=args.samples_per_shard,
                                num_workers=args.workers)
        print(format_report(manifest))
        print(f"  -> {out}")
