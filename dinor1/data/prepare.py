"""CLI glue for the offline side: synthetic data, conversions, and the data-only demo."""

from __future__ import annotations

import time
from pathlib import Path

from data_pipelines import converters
from data_pipelines.shard_writer import format_report, write_shards
from dinor1.errors import UserError

SPLITS = ("train", "val", "support")


def synthesize(out: str, *, samples_per_shard: int = 500, workers: int = 1, shards: bool = True,
               **knobs) -> dict[str, Path]:
    """Generate the synthetic dataset under ``out/coco`` and its shards under ``out/shards``.

    Returns {split: shard folder} (or {split: annotation JSON} with ``shards=False``).
    """
    from data_pipelines.synthetic import SyntheticConfig, generate_synthetic_coco

    try:
        config = SyntheticConfig(**knobs)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    coco_dir = Path(out) / "coco"
    annotations = generate_synthetic_coco(coco_dir, config, num_workers=workers, progress=True)
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
                                num_workers=workers)
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
        from data_pipelines.converters.odinw import load_odinw_split

        for rel, ann, images in converters.find_odinw_datasets(args.root):
            jobs.append((load_odinw_split(args.root, rel, ann, images), Path(args.out) / rel))
    for source, out in jobs:
        manifest = write_shards(source, out, samples_per_shard=args.samples_per_shard,
                                num_workers=args.workers)
        print(format_report(manifest))
        print(f"  -> {out}")


def demo(out: str, *, num_train: int = 2000, overrides: tuple[str, ...] = ()) -> None:
    """``make demo``: synthetic data -> shards -> inspect -> SFT then GRQO on a local Ray with
    2 DeepSpeed workers, tracked in MLflow (sqlite under ``out/runs``).

    Evaluation and the SFT-vs-GRQO comparison arrive with the demo issue.
    """
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from dinor1.config import load_train_config
    from dinor1.data.inspect import format_inspect_report, inspect_shards
    from dinor1.train.launch import resolve_paths, run_training

    t0 = time.time()
    dirs = synthesize(out, num_train=num_train, num_val=200, num_support=100,
                      workers=os.cpu_count() or 1)
    report = inspect_shards(str(dirs["train"]), grid_path=str(Path(out) / "train_grid.png"))
    print(format_inspect_report(report, top=10))
    job = Path(__file__).parents[2] / "jobs" / "demo.yaml"
    cfg = load_train_config(job if job.exists() else None, [
        f"data.train_shards={dirs['train']}", f"checkpointing.storage_path={Path(out) / 'runs'}",
        *overrides])
    result = run_training(cfg)
    storage, name, uri = resolve_paths(cfg)
    print(f"[demo] finished in {(time.time() - t0) / 60:.1f} min; sample grid {report['grid']}")
    print(f"[demo] final weights: {storage / name / 'final_model'}")
    print(f"[demo] MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 "
          "--port 5000  (then open http://127.0.0.1:5000)")
    if result.error is not None:
        raise RuntimeError(f"demo training failed: {result.error}")
