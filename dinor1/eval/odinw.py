"""ODinW: every dataset of a converted ODinW tree evaluated on its own, then the ODinW-13 and
ODinW-35 means.

``dinor1 data convert odinw`` writes ``OUT/<dataset path>/<split>/`` shard sets (e.g.
``OUT/AerialMaritimeDrone/large/valid``). With ``eval.scorer=odinw`` and ``eval.shards=OUT``,
each dataset's ``valid`` split (else ``val``, else ``test``) is scored with pycocotools, using
generic prompts built from the same dataset's ``train`` split (each dataset has its own classes).
Metrics: ``eval/<mode>/odinw/<dataset>/AP`` per dataset and ``eval/<mode>/odinw13/mAP``,
``eval/<mode>/odinw35/mAP``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dinor1.config import TrainConfig
from dinor1.errors import UserError

EVAL_SPLITS = ("valid", "val", "test")


def find_odinw_shard_sets(root: str | Path) -> dict[str, tuple[Path, Path | None]]:
    """{dataset path: (eval split folder, train split folder or None)} under a converted tree."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"eval.shards: ODinW shard root {root} is not a folder")
    splits: dict[str, dict[str, Path]] = {}
    for manifest in sorted(root.rglob("manifest.json")):
        folder = manifest.parent
        dataset = folder.parent.relative_to(root).as_posix()
        splits.setdefault(dataset, {})[folder.name] = folder
    found = {}
    for dataset, by_split in splits.items():
        split = next((s for s in EVAL_SPLITS if s in by_split), None)
        if split is not None:
            found[dataset] = (by_split[split], by_split.get("train"))
    if not found:
        raise UserError(f"eval.shards: no dataset with a {'/'.join(EVAL_SPLITS)} shard set "
                        f"under {root}")
    return found


def evaluate_odinw(cfg: TrainConfig, *, log_mlflow: bool = True):
    """Evaluate each ODinW dataset (see the module docstring); returns an ``EvalOutcome``
    whose metrics hold the per-dataset APs and the ODinW means."""
    from dinor1.config import local_output_dir, resolve_paths
    from dinor1.data.quality import QualityCounter
    from dinor1.eval.evaluate import (
        EvalOutcome,
        eval_location,
        evaluate,
        log_eval_run,
        register_evaluated,
        resolve_checkpoint,
    )
    from dinor1.eval.scoring import odinw_summary

    eval_location(cfg)  # the error a missing eval.shards / data.val_shards gives any job
    if cfg.eval.shards is None:
        raise UserError("eval.scorer odinw needs eval.shards (the converted ODinW root)")
    datasets = find_odinw_shard_sets(cfg.eval.shards)
    storage, name, uri = resolve_paths(cfg)
    out_dir = Path(cfg.eval.out_dir or local_output_dir(storage, name, "eval"))
    out_dir = out_dir.expanduser().resolve()
    metrics: dict[str, float] = {}
    per_mode: dict[str, dict[str, float]] = {}
    modes = {}
    images = 0
    quality = QualityCounter(max_errors=None)
    seconds = scoring = 0.0
    for dataset, (split, train) in datasets.items():
        if train is None and cfg.eval.generic_prompts is None and \
                "generic" in cfg.eval.prompt_modes:
            raise UserError(f"ODinW dataset {dataset}: no train split to build prompts from")
        sub = cfg.model_copy(deep=True)
        sub.eval.scorer = "coco"
        sub.eval.shards = str(split)
        sub.eval.support_shards = str(train) if train else None
        sub.eval.out_dir = str(out_dir / dataset)
        print(f"[eval] ODinW {dataset}", file=sys.stderr, flush=True)
        outcome = evaluate(sub, log_mlflow=False)
        images += outcome.num_images
        quality.merge(outcome.quality)
        seconds += outcome.num_images * len(outcome.modes) / max(outcome.images_per_s, 1e-9)
        scoring += outcome.scoring_seconds
        for mode, result in outcome.modes.items():
            ap = result.metrics[f"eval/{mode}/AP"]
            per_mode.setdefault(mode, {})[dataset] = ap
            metrics[f"eval/{mode}/odinw/{dataset}/AP"] = ap
            modes[f"{mode}/{dataset}"] = result
    for mode, aps in per_mode.items():
        metrics.update({f"eval/{mode}/{k}": v for k, v in odinw_summary(aps).items()})
        metrics[f"eval/{mode}/odinw/mean_AP"] = sum(aps.values()) / len(aps)
    metrics.update({"eval/images": float(images), **quality.metrics("eval/", reduce=False),
                    "eval/images_per_s": images * len(per_mode) / max(seconds, 1e-9),
                    "eval/scoring_fraction": scoring / max(seconds, 1e-9)})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    outcome = EvalOutcome(metrics=metrics, modes=modes, out_dir=out_dir, num_images=images,
                          num_skipped=quality.skipped_samples, skipped_errors=quality.errors,
                          images_per_s=metrics["eval/images_per_s"], scoring_seconds=scoring,
                          quality=quality)
    if log_mlflow:
        source = resolve_checkpoint(cfg.eval.checkpoint, uri)
        outcome.run_id = log_eval_run(cfg, uri, source, outcome)
        register_evaluated(cfg, uri, source, outcome)
    return outcome
