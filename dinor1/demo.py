"""``make demo``: the paper's SFT-vs-GRQO comparison scaled down to a laptop CPU.

::

    synthetic data -> shards -> SFT prefix (P epochs, checkpoint)
                                  |-> branch "sft":  B more epochs of SFT   (SFT P+B)
                                  '-> branch "grqo": B epochs with GRQO     (the paper's "1+5")
    each branch -> dinor1 eval (generic visual prompts; seen and novel classes apart)
    -> dinor1 compare table + PNG

Both branches start from the prefix's full training state (weights, optimiser, step), so they
differ only in the objective of their last B epochs. Everything runs on one local Ray (2
DeepSpeed ZeRO-2 workers) and is tracked in MLflow on a sqlite file under ``OUT/runs``.
The same function serves ``bench/grqo_vs_sft.py`` (several seeds).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
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


def _stage(message: str, started: float) -> None:
    print(f"[demo {(time.time() - started) / 60:4.1f} min] {message}", file=sys.stderr, flush=True)


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
    metrics, names = {}, {}
    for recipe, cfg in recipes.items():
        _stage(f"seed {seed}: branch {recipe} ({branch_epochs} epochs from the prefix)", started)
        result = run_training(cfg)
        if result.error is not None:
            raise RuntimeError(f"{recipe} branch failed: {result.error}")
        storage, name, uri = resolve_paths(cfg)
        _stage(f"seed {seed}: evaluating {recipe} on the val split (generic prompts)", started)
        cfg.eval.checkpoint = join(storage, name)
        metrics[recipe] = evaluate_job(cfg).metrics
        names[recipe] = name
    return RecipeRuns(seed=seed, metrics=metrics, run_names=names, tracking_uri=uri,
                      experiment=prefix.mlflow.experiment, minutes=(time.time() - started) / 60)


def demo(out: str, *, num_train: int = 2000, overrides: tuple[str, ...] = ()) -> RecipeRuns:
    """The whole demo; prints the comparison table, the PNG path and how to open MLflow."""
    import os

    from dinor1.compare import compare_runs
    from dinor1.data.inspect import format_inspect_report, inspect_shards
    from dinor1.data.prepare import synthesize

    started = time.time()
    out_dir = Path(out)
    _stage("synthetic dataset -> shards", started)
    shards = synthesize(out, num_train=num_train, num_val=200, num_support=100,
                        workers=os.cpu_count() or 1)
    report = inspect_shards(str(shards["train"]), grid_path=str(out_dir / "train_grid.png"))
    print(format_inspect_report(report, top=10))
    runs_dir = out_dir / "runs"
    if runs_dir.exists():  # a fresh comparison each time (old runs would be resumed instead)
        _stage(f"removing the previous demo runs in {runs_dir}", started)
        shutil.rmtree(runs_dir)
    runs = run_recipes(shards, runs_dir, overrides=overrides, started=started)
    comparison = compare_runs(runs.experiment, tracking_uri=runs.tracking_uri,
                              runs=list(runs.run_names.values()), out_dir=out_dir / "compare")
    print("\n" + comparison.as_text())
    sft, grqo = runs.metrics["sft"], runs.metrics["grqo"]
    print("\nSFT vs GRQO on the synthetic val split (generic visual prompts):")
    for key in ("AP", "AP50", "seen/AP50", "novel/AP50"):
        name = f"eval/generic/{key}"
        print(f"  {key:<11} SFT {sft[name]:.3f}   GRQO {grqo[name]:.3f}   "
              f"GRQO - SFT {grqo[name] - sft[name]:+.3f}")
    print(f"\n[demo] finished in {(time.time() - started) / 60:.1f} min")
    print(f"[demo] comparison PNG: {comparison.png}")
    print(f"[demo] MLflow UI: .venv/bin/mlflow ui --backend-store-uri {runs.tracking_uri} "
          "--host 127.0.0.1 --port 5000   (then open http://127.0.0.1:5000)")
    return runs
