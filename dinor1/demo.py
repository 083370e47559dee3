"""``make demo``: the paper's SFT-vs-GRQO comparison scaled down to a laptop CPU.

::

    synthetic data -> shards -> SFT prefix (P epochs, checkpoint)
                                  |-> branch "sft":  B more epochs of SFT   (SFT P+B)
                                  '-> branch "grqo": B epochs with GRQO     (the paper's "1+5")
    each branch -> dinor1 eval (generic visual prompts; seen and novel classes apart)
    -> dinor1 compare table + PNG -> dinor1 predict on a val image with the GRQO model

Both branches start from the prefix's full training state (weights, optimiser, step), so they
differ only in the objective of their last B epochs. Everything runs on one local Ray (2
DeepSpeed ZeRO-2 workers) and is tracked in MLflow on a sqlite file under ``OUT/runs``.
The same function serves ``bench/grqo_vs_sft.py`` (several seeds).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dinor1.errors import UserError
from dinor1.jobs_index import packaged_job

JOB = "demo"  # the packaged job (jobs/demo.yaml), see dinor1.jobs_index


@dataclass
class RecipeRuns:
    """What one seed of the comparison produced."""

    seed: int
    metrics: dict[str, dict[str, float]]  # recipe -> eval metrics
    run_names: dict[str, str]  # recipe -> MLflow run name
    tracking_uri: str
    experiment: str
    minutes: float
    folders: dict[str, str] = field(default_factory=dict)  # recipe -> run folder


ACCURACY_BAR = ("eval/generic/seen/AP50", 0.5)  # the SFT branch's, on the val split
# the columns of the comparison table the demo prints (compare.csv/.md hold them all)
TABLE_COLUMNS = {"run": "run", "recipe": "recipe", "eval/generic/AP": "AP",
                 "eval/generic/AP50": "AP50", "eval/generic/seen/AP50": "seen AP50",
                 "eval/generic/novel/AP50": "novel AP50", "steps": "steps", "wall": "train time"}


def _stage(message: str, started: float) -> None:
    print(f"[demo {(time.time() - started) / 60:4.1f} min] {message}", file=sys.stderr, flush=True)


def _say(text: str = "") -> None:
    print(text, flush=True)  # (in order with the stage lines and Ray's, in a pipe too)


def run_recipes(shards: dict[str, Path], runs_dir: Path, *, seed: int = 0,
                prefix_epochs: int = 3, branch_epochs: int = 2,
                overrides: tuple[str, ...] = (), started: float | None = None,
                variants: dict[str, tuple[str, ...]] | None = None) -> RecipeRuns:
    """SFT prefix, then the SFT and GRQO branches from its checkpoint, each evaluated.

    ``variants`` adds more GRQO branches from the same prefix, each with its own overrides
    (e.g. ``{"grqo-pg": ("grqo.form=policy_gradient",)}``); their metrics are keyed by name.
    """
    from dinor1.config import load_train_config, resolve_paths
    from dinor1.eval.job import evaluate_job
    from dinor1.storage import join
    from dinor1.train.launch import run_training

    started = started or time.time()
    common = [f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}",
              f"eval.support_shards={shards['support']}", f"checkpointing.storage_path={runs_dir}",
              f"seed={seed}", f"data.seed={seed}", *overrides]
    job = packaged_job(JOB)

    def config(name: str, sft: int, grqo: int, *extra: str):
        return load_train_config(job, [*common, f"mlflow.run_name={name}",
                                       f"stages.sft_epochs={sft}", f"stages.grqo_epochs={grqo}",
                                       *extra])

    prefix = config(f"sft-prefix-s{seed}", prefix_epochs, 0)
    _stage(f"seed {seed}: SFT prefix, {prefix_epochs} epochs", started)
    result = run_training(prefix)
    if result.error is not None:
        raise RuntimeError(f"SFT prefix failed: {result.error}")
    checkpoint = result.checkpoint.path
    recipes = {
        "sft": config(f"sft-s{seed}", prefix_epochs + branch_epochs, 0,
                      f"checkpointing.start_from={checkpoint}"),
        "grqo": config(f"grqo-s{seed}", prefix_epochs, branch_epochs,
                       f"checkpointing.start_from={checkpoint}"),
    }
    for name, extra in (variants or {}).items():
        if name in recipes:
            raise UserError(f"variant name {name!r} clashes with a built-in recipe")
        recipes[name] = config(f"{name}-s{seed}", prefix_epochs, branch_epochs,
                               f"checkpointing.start_from={checkpoint}", *extra)
    metrics, names, folders = {}, {}, {}
    for recipe, cfg in recipes.items():
        _stage(f"seed {seed}: branch {recipe} ({branch_epochs} epochs from the prefix)", started)
        result = run_training(cfg)
        if result.error is not None:
            raise RuntimeError(f"{recipe} branch failed: {result.error}")
        storage, name, uri = resolve_paths(cfg)
        _stage(f"seed {seed}: evaluating {recipe} on the val split (generic prompts)", started)
        cfg.eval.checkpoint = join(storage, name)
        metrics[recipe] = evaluate_job(cfg).metrics
        names[recipe], folders[recipe] = name, cfg.eval.checkpoint
    return RecipeRuns(seed=seed, metrics=metrics, run_names=names, tracking_uri=uri,
                      experiment=prefix.mlflow.experiment, minutes=(time.time() - started) / 60,
                      folders=folders)


def _shards_line(report: dict, shards: dict[str, Path]) -> str:
    """One line for the shards the demo wrote (``dinor1 data inspect`` prints it all)."""
    from dinor1.data.pipeline import open_shard_set

    sizes = {split: (open_shard_set(str(path)).manifest or {}).get("num_samples", "?")
             for split, path in shards.items()}
    checked = [s for s in report["shards"] if s["sha256_ok"] is not None]
    ok = len(checked) - len(report["checksum_failures"])
    return (f"shards in {Path(shards['train']).parent}: train {sizes.get('train')} images, "
            f"{report['num_boxes']} boxes of {len(report['categories'])} classes (checksums "
            f"{ok}/{len(checked)} ok), val {sizes.get('val')}, support {sizes.get('support')}; "
            f"samples drawn in {report.get('grid')}")


def pick_val_prompt(coco_dir: Path) -> tuple[Path, list[float], str]:
    """A val image and the box (x0, y0, x1, y1) and class name of one of its objects: the first
    image with two objects of a class (so the prompt has another one to find), else the first
    object."""
    data = json.loads((coco_dir / "annotations" / "instances_val.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    if not by_image:
        raise UserError(f"{coco_dir}: the val split has no objects to prompt with")
    chosen = next(iter(by_image.values()))[0]
    for anns in by_image.values():
        classes = [a["category_id"] for a in anns]
        repeated = [a for a in anns if classes.count(a["category_id"]) > 1]
        if repeated:
            chosen = repeated[0]
            break
    x, y, w, h = chosen["bbox"]
    return (coco_dir / "images" / "val" / files[chosen["image_id"]],
            [round(x), round(y), round(x + w), round(y + h)], names[chosen["category_id"]])


def demo_prediction(out_dir: Path, checkpoint: str, started: float) -> Path:
    """``dinor1 predict`` with its defaults on a val image, prompted with one object's box."""
    from dinor1.predict import PromptBox, predict_image

    image, box, name = pick_val_prompt(out_dir / "coco")
    spec = ",".join(str(v) for v in box) + f":{name.replace(' ', '_')}"
    _stage(f"dinor1 predict --checkpoint {checkpoint} --image {image} --box {spec}", started)
    png = out_dir / f"predict_{image.stem}.png"
    payload = predict_image(checkpoint, str(image), boxes=[PromptBox(tuple(box), spec[
        spec.index(":") + 1:])], out_png=png, out_json=png.with_suffix(".json"))
    found = ", ".join(f"{d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box_xyxy'])}]"
                      for d in payload["detections"])
    _say(f"  {len(payload['detections'])} {name}(s) found (score [x0, y0, x1, y1]): {found}")
    return png


def demo(out: str, *, num_train: int = 2000, overrides: tuple[str, ...] = ()) -> RecipeRuns:
    """The whole demo; prints the comparison table, the PNG paths and how to open MLflow.
    Quiet unless ``--verbose`` (dinor1/console.py): one line per phase, the training runs'
    progress lines, the evaluations' results."""
    import os

    from dinor1.compare import compare_runs
    from dinor1.console import is_verbose
    from dinor1.data.inspect import format_inspect_report, inspect_shards
    from dinor1.data.prepare import synthesize

    started = time.time()
    out_dir = Path(out)
    _stage("synthetic dataset -> shards", started)
    shards = synthesize(out, num_train=num_train, num_val=200, num_support=100,
                        workers=os.cpu_count() or 1, progress=is_verbose())
    report = inspect_shards(str(shards["train"]), grid_path=str(out_dir / "train_grid.png"))
    if is_verbose():
        _say(format_inspect_report(report, top=10))
    else:
        _stage(_shards_line(report, shards), started)
    runs_dir = out_dir / "runs"
    if runs_dir.exists():  # a fresh comparison each time (old runs would be resumed instead)
        _stage(f"removing the previous demo runs in {runs_dir}", started)
        shutil.rmtree(runs_dir)
    runs = run_recipes(shards, runs_dir, overrides=overrides, started=started)
    comparison = compare_runs(runs.experiment, tracking_uri=runs.tracking_uri,
                              runs=list(runs.run_names.values()), out_dir=out_dir / "compare")
    _say("\n" + comparison.as_text(columns=None if is_verbose() else TABLE_COLUMNS))
    sft, grqo = runs.metrics["sft"], runs.metrics["grqo"]
    _say("\nSFT vs GRQO on the synthetic val split (generic visual prompts):")
    for key in ("AP", "AP50", "seen/AP50", "novel/AP50"):
        name = f"eval/generic/{key}"
        _say(f"  {key:<11} SFT {sft[name]:.3f}   GRQO {grqo[name]:.3f}   "
             f"GRQO - SFT {grqo[name] - sft[name]:+.3f}")
    metric, bar = ACCURACY_BAR
    held = sft[metric] >= bar
    _say(f"  accuracy bar: SFT {metric.split('/', 2)[2]} {sft[metric]:.3f} "
         f"{'>=' if held else '<'} {bar} ({'met' if held else 'NOT met'})\n")
    png = demo_prediction(out_dir, runs.folders["grqo"], started)
    _say(f"\n[demo] finished in {(time.time() - started) / 60:.1f} min")
    _say(f"[demo] prediction PNG: {png}")
    _say(f"[demo] comparison PNG: {comparison.png}")
    _say(f"[demo] MLflow UI: .venv/bin/mlflow ui --backend-store-uri {runs.tracking_uri} "
         "--host 127.0.0.1 --port 5000   (then open http://127.0.0.1:5000)")
    return runs
