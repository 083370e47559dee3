"""``dinor1 eval``: checkpoint + evaluation shards -> COCO results, AP, artifacts, MLflow.

::

    shards --Ray Data read + decode--> rows --map_batches(BatchPredictor, actor pool)--> detections
    detections + the ground truth the rows carried --pycocotools / faster-coco-eval--> metrics

Generic prompts are built once on the driver from the support split (N instances per class,
saved as ``generic_prompts.safetensors``), then every actor loads them. Metrics are named
``eval/<prompt mode>/<metric>`` (``eval/generic/AP50``, ``eval/generic/novel/AP``) and go to a new
MLflow run tagged ``dinor1.run_kind=eval`` and, when the checkpoint came from a training run,
``dinor1.train_run_id`` (``dinor1 compare`` merges the two).

Bad input is skipped, never fatal: the run also logs ``eval/skipped_samples``,
``eval/skipped/<kind>``, ``eval/dropped_boxes``, ``eval/dropped_boxes/<rule>`` and
``eval/clipped_boxes`` (:mod:`dinor1.data.quality`), and writes every skipped sample's message to
``skipped_samples.txt``. Scoring is against the cleaned ground truth: annotations the cleaning
rules dropped are not in it, and clipped boxes are scored as clipped.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinor1.config import TrainConfig, experiment_id, local_output_dir, resolve_paths
from dinor1.data.quality import QualityCounter
from dinor1.errors import UserError
from dinor1.eval.inference import BatchPredictor

PROMPTS_FILE = "generic_prompts.safetensors"
PROGRESS_SECONDS = 10.0
SKIPPED_FILE = "skipped_samples.txt"


@dataclass
class ModelSource:
    """Where the weights come from, and the training run they belong to (if known)."""

    path: str
    train_run_id: str | None = None


def resolve_checkpoint(checkpoint: str | None, tracking_uri: str | None = None) -> ModelSource:
    """A dinor1 model directory, a training run folder (``<storage>/<name>``, whose
    ``final_model`` is used), a registered or logged MLflow model (``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS``, ``runs:/RUN/model``: downloaded from ``tracking_uri``, default
    MLflow's own), a Hugging Face checkpoint directory or hub name, or a preset."""
    from dinor1.model.presets import PRESETS
    from dinor1.registry import download_model, is_model_uri

    if not checkpoint:
        raise UserError("config key 'eval.checkpoint' is required (checkpoint=PATH)")
    if checkpoint in PRESETS:
        return ModelSource(checkpoint)
    if is_model_uri(checkpoint):
        return ModelSource(*download_model(checkpoint, tracking_uri))
    from dinor1 import storage

    if storage.is_uri(checkpoint):  # a run folder or model directory in an object store
        run_id = None
        if storage.exists(storage.join(checkpoint, "final_model", "config.json")):
            if storage.exists(storage.join(checkpoint, "mlflow_run_id")):
                run_id = storage.read_text(storage.join(checkpoint, "mlflow_run_id")).strip()
            checkpoint = storage.join(checkpoint, "final_model")
        if not storage.exists(storage.join(checkpoint, "config.json")):
            raise UserError(f"eval.checkpoint: {checkpoint} has no config.json (give a run "
                            "folder or its final_model)")
        return ModelSource(checkpoint, run_id)  # every actor loads it (cached per node)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1:
            raise UserError(f"eval.checkpoint: {checkpoint} does not exist")
        return ModelSource(checkpoint)  # a hub name such as IDEA-Research/grounding-dino-tiny
    if (path / "final_model" / "config.json").is_file():
        path = path / "final_model"
    if not (path / "config.json").is_file():
        raise UserError(f"eval.checkpoint: {path} has no config.json (give a model directory such "
                        "as <run folder>/final_model, a run folder, or a preset name)")
    run_file = path.parent / "mlflow_run_id"
    run_id = run_file.read_text().strip() if run_file.is_file() else None
    return ModelSource(str(path.resolve()), run_id)


def load_model(source: ModelSource):
    from dinor1.model.dino_r1 import DinoR1

    try:
        return DinoR1.from_pretrained(source.path).eval()
    except (OSError, ValueError) as exc:
        raise UserError(f"eval.checkpoint {source.path}: cannot load ({exc})") from exc


def dataset_categories(manifest: dict | None) -> list[dict]:
    """COCO category entries (with ``novel`` / ``frequency`` when the dataset marks them)."""
    if not manifest:
        return []
    attributes = manifest.get("category_attributes", {})
    return [{"id": int(k), "name": name, **attributes.get(k, {})}
            for k, name in sorted(manifest["categories"].items(), key=lambda kv: int(kv[0]))]


def build_prompts(model, cfg: TrainConfig, categories: list[dict], out_path: Path):
    """Generic prompts from the support shards, saved to ``out_path``."""
    from dinor1.data.pipeline import detection_dataset, iter_detection_batches
    from dinor1.model.prompts import build_generic_prompts

    location = cfg.eval.support_shards or cfg.data.train_shards
    if location is None:
        raise UserError("generic prompts need eval.support_shards (or data.train_shards)")
    support = detection_dataset(location, cfg.data, train=False)
    support.context.execution_options.preserve_order = True  # the same prompts every time
    batches = iter_detection_batches(support, cfg.data.model_copy(update={"batch_size": 8}),
                                     train=False, device="cpu")
    names = {c["id"]: c["name"] for c in categories}
    prompts = build_generic_prompts(model, batches, names, per_class=cfg.eval.prompts_per_class,
                                    allow_missing=True)
    left_out = sorted(set(names) - set(prompts.category_ids))
    if left_out:
        print(f"[eval] support split lacks {len(left_out)} categories (no prompt, AP 0): "
              f"{left_out[:10]}", file=sys.stderr)
    prompts.save(out_path)
    return prompts


@dataclass
class ModeResult:
    mode: str
    metrics: dict[str, float]
    score: object  # dinor1.eval.scoring.ScoreResult
    detections: list[dict]
    files: list[Path] = field(default_factory=list)


@dataclass
class EvalOutcome:
    metrics: dict[str, float]  # eval/<mode>/<metric>
    modes: dict[str, ModeResult]
    out_dir: Path
    num_images: int
    num_skipped: int
    skipped_errors: list[str]
    images_per_s: float
    scoring_seconds: float
    run_id: str | None = None
    quality: QualityCounter = field(default_factory=QualityCounter)


def predict_shards(cfg: TrainConfig, source: ModelSource, mode: str, *,
                   prompts_path: Path | None, classes: dict[int, str],
                   predictor: type = BatchPredictor) -> list[dict]:
    """Ray Data batch inference; one output row per shard sample (``error`` set if skipped).

    ``predictor`` is the actor class (:class:`BatchPredictor`; tests swap in one that returns
    the ground truth, to check the scoring path end to end).
    """
    from ray.data import ActorPoolStrategy

    from dinor1.console import is_verbose
    from dinor1.data.pipeline import detection_dataset

    # decode in blocks of one inference batch, so every actor of the pool gets work
    data = cfg.data.model_copy(update={"decode_batch_size": cfg.eval.batch_size})
    ds = detection_dataset(cfg.eval.shards or cfg.data.val_shards, data, train=False)
    if cfg.eval.max_images:
        ds = ds.limit(cfg.eval.max_images)
    e = cfg.eval
    predicted = ds.map_batches(
        predictor,
        fn_constructor_kwargs={
            "model_source": source.path, "mode": mode, "data": cfg.data.model_dump(mode="json"),
            "generic_prompts": str(prompts_path) if prompts_path else None, "classes": classes,
            "top_k": e.top_k, "chunk_size": e.prompt_chunk_size},
        batch_size=e.batch_size, batch_format="numpy", compute=ActorPoolStrategy(
            size=e.num_actors), num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor or None)
    rows, started = [], time.perf_counter()
    said = started  # quiet: a progress line at most every PROGRESS_SECONDS
    for row in predicted.iter_rows():
        rows.append(row)
        now = time.perf_counter()
        if len(rows) % 100 == 0 and (is_verbose() or now - said >= PROGRESS_SECONDS):
            said = now
            print(f"[eval] {mode}: {len(rows)} images ({len(rows) / (now - started):.1f} "
                  "images/s)", file=sys.stderr, flush=True)
    return rows


def score_rows(rows: list[dict], categories: list[dict], scorer: str, backend: str):
    """Rows from :func:`predict_shards` -> (ScoreResult, GT dict, detections, skipped errors)."""
    from dinor1.eval.scoring import coco_ground_truth, score_coco, score_lvis

    images, annotations, detections, errors = {}, [], [], []
    for row in rows:
        if row["error"]:
            errors.append(str(row["error"]))
            continue
        image = json.loads(row["image"])
        if image["id"] in images:  # the same image twice in the shards: score it once
            continue
        images[image["id"]] = image
        annotations.extend(json.loads(row["annotations"]))
        detections.extend(json.loads(row["detections"]))
    if not categories:  # no manifest: the ids seen, named by id
        seen = sorted({a["category_id"] for a in annotations})
        categories = [{"id": c, "name": str(c)} for c in seen]
    gt = coco_ground_truth(list(images.values()), annotations, categories)
    if scorer == "lvis":
        result = score_lvis(gt, detections)
    else:
        novel = [c["id"] for c in categories if c.get("novel")]
        result = score_coco(gt, detections, novel_category_ids=novel, backend=backend)
    return result, gt, detections, errors


def count_quality(rows: list[dict]) -> QualityCounter:
    """Rows from :func:`predict_shards` -> skipped samples by kind (every message kept) and the
    ground-truth boxes cleaning dropped (by rule) or clipped in the rows that were scored."""
    quality = QualityCounter(max_errors=None)
    for row in rows:
        if row["error"]:
            quality.add_skipped([str(row["error"])])
        elif "dropped_by_rule" in row:
            quality.add_boxes(np.asarray(row["dropped_by_rule"]).tolist(),
                              int(row["clipped_boxes"]))
    return quality


def report_quality(quality: QualityCounter, out_dir: Path) -> None:
    """Write ``skipped_samples.txt`` (one message per line) and say what scoring left out (when
    anything was, or with ``--verbose``)."""
    from dinor1.console import is_verbose

    (out_dir / SKIPPED_FILE).write_text("".join(f"{e}\n" for e in quality.errors))
    if not (is_verbose() or quality.skipped_samples or quality.dropped_boxes or quality.clipped):
        return
    kinds = ", ".join(f"{k} {n}" for k, n in quality.skipped.items() if n)
    rules = ", ".join(f"{r} {n}" for r, n in quality.dropped.items() if n)
    print(f"[eval] {quality.skipped_samples} samples skipped{f' ({kinds})' if kinds else ''}, "
          f"listed in {out_dir / SKIPPED_FILE}; scored against the cleaned ground truth: "
          f"{quality.dropped_boxes} boxes dropped{f' ({rules})' if rules else ''}, "
          f"{quality.clipped} clipped to the image", file=sys.stderr, flush=True)


def _grid_items(cfg: TrainConfig, gt: dict, detections: list[dict], count: int):
    """(original image, its detections, its ground truth) for the first ``count`` images."""
    from PIL import Image

    from dinor1.data.datasource import iter_shard_rows
    from dinor1.data.pipeline import open_shard_set

    wanted = [im["id"] for im in gt["images"][:count]]
    found: dict[int, np.ndarray] = {}
    shard_set = open_shard_set(cfg.eval.shards or cfg.data.val_shards)
    for path in shard_set.paths:
        with shard_set.filesystem.open_input_stream(path) as f:
            for row in iter_shard_rows(f, path):
                if row["error"]:
                    continue
                image_id = json.loads(row["json"]).get("image_id")
                if image_id in wanted and image_id not in found:
                    with Image.open(io.BytesIO(row["image"])) as img:
                        found[image_id] = np.asarray(img.convert("RGB"))
                if len(found) == len(wanted):
                    break
        if len(found) == len(wanted):
            break
    by_image: dict[int, list] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    truth: dict[int, list] = {}
    for a in gt["annotations"]:
        truth.setdefault(a["image_id"], []).append(a)
    return [(found[i], by_image.get(i, []), truth.get(i, [])) for i in wanted if i in found]


def write_artifacts(cfg: TrainConfig, result: ModeResult, gt: dict, out_dir: Path) -> None:
    from dinor1.eval.report import (
        per_category_markdown,
        plot_pr_curves,
        prediction_grid,
        write_per_category_csv,
    )

    mode = result.mode
    files = [out_dir / f"detections_{mode}.json", out_dir / f"per_category_{mode}.md"]
    files[0].write_text(json.dumps(result.detections))
    files[1].write_text(per_category_markdown(result.score))
    files.append(write_per_category_csv(result.score, out_dir / f"per_category_{mode}.csv"))
    files.append(plot_pr_curves(result.score, out_dir / f"pr_curve_{mode}.png",
                                title=f"{mode} prompts"))
    if cfg.eval.grid_images:
        names = {c["id"]: c["name"] for c in gt["categories"]}
        items = _grid_items(cfg, gt, result.detections, cfg.eval.grid_images)
        files.append(prediction_grid(items, names, out_dir / f"predictions_{mode}.png"))
    result.files = files


def eval_location(cfg: TrainConfig) -> str | list[str]:
    """Where the evaluation shards are: ``eval.shards``, else ``data.val_shards``."""
    location = cfg.eval.shards or cfg.data.val_shards
    if location is None:
        raise UserError("config key 'eval.shards' (or 'data.val_shards') is required")
    return location


def evaluate(cfg: TrainConfig, *, log_mlflow: bool = True) -> EvalOutcome:
    """Run every prompt mode of ``cfg.eval`` on one shard set and score it; see the module
    docstring. A job with ``eval.scorer=odinw`` (a tree of shard sets) goes through
    :func:`dinor1.eval.job.evaluate_job`, which is what ``dinor1 eval`` calls."""
    import ray

    from dinor1.data.pipeline import open_shard_set

    location = eval_location(cfg)
    if cfg.eval.scorer == "odinw":
        raise UserError("eval.scorer odinw: evaluate the ODinW tree with "
                        "dinor1.eval.job.evaluate_job (as `dinor1 eval` does)")
    shard_set = open_shard_set(location)
    categories = dataset_categories(shard_set.manifest)
    dataset_name = (shard_set.manifest or {}).get("dataset", "")
    scorer = cfg.eval.scorer
    if scorer == "auto":
        scorer = "lvis" if dataset_name.lower().startswith("lvis") else "coco"
    storage, name, uri = resolve_paths(cfg)
    source = resolve_checkpoint(cfg.eval.checkpoint, uri)
    out_dir = Path(cfg.eval.out_dir or local_output_dir(storage, name, "eval"))
    out_dir = out_dir.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    from dinor1.console import quiet_ray_data

    quiet_ray_data()
    classes = {c["id"]: c["name"] for c in categories}
    prompts_path = None
    if "generic" in cfg.eval.prompt_modes:
        prompts_path = out_dir / PROMPTS_FILE
        if cfg.eval.generic_prompts:
            if not Path(cfg.eval.generic_prompts).is_file():
                raise UserError(f"eval.generic_prompts: {cfg.eval.generic_prompts} not found")
            prompts_path.write_bytes(Path(cfg.eval.generic_prompts).read_bytes())
        else:
            if not categories:
                raise UserError(f"{location}: no manifest.json, so the classes to prompt for are "
                                "unknown; give eval.generic_prompts")
            build_prompts(load_model(source), cfg, categories, prompts_path)
    if "text" in cfg.eval.prompt_modes and not classes:
        raise UserError(f"{location}: no manifest.json with class names for text prompts")
    modes, metrics = {}, {}
    num_images = 0
    quality = QualityCounter(max_errors=None)
    predict_seconds = scoring_seconds = 0.0
    for mode in cfg.eval.prompt_modes:
        started = time.perf_counter()
        rows = predict_shards(cfg, source, mode, prompts_path=prompts_path, classes=classes)
        scored = time.perf_counter()
        score, gt, detections, _ = score_rows(rows, categories, scorer, cfg.eval.backend)
        scoring_seconds += time.perf_counter() - scored
        predict_seconds += scored - started
        num_images, quality = len(gt["images"]), count_quality(rows)  # the same in every mode
        result = ModeResult(mode, {f"eval/{mode}/{k}": float(v) for k, v in
                                   score.metrics.items()}, score, detections)
        write_artifacts(cfg, result, gt, out_dir)
        modes[mode] = result
        metrics.update(result.metrics)
        print(f"[eval] {mode}: " + ", ".join(f"{k.split('/', 2)[2]} {v:.3f}" for k, v in
                                             result.metrics.items() if "AP" in k),
              file=sys.stderr, flush=True)
    metrics["eval/images"] = float(num_images)
    metrics.update(quality.metrics("eval/", reduce=False))
    report_quality(quality, out_dir)
    total = predict_seconds + scoring_seconds
    outcome = EvalOutcome(
        metrics=metrics, modes=modes, out_dir=out_dir, num_images=num_images,
        num_skipped=quality.skipped_samples, skipped_errors=quality.errors,
        images_per_s=num_images * len(modes) / max(total, 1e-9),
        scoring_seconds=scoring_seconds, quality=quality)
    metrics["eval/images_per_s"] = outcome.images_per_s
    metrics["eval/scoring_fraction"] = scoring_seconds / max(total, 1e-9)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if log_mlflow:
        outcome.run_id = log_eval_run(cfg, uri, source, outcome)
        register_evaluated(cfg, uri, source, outcome)
    return outcome


def register_evaluated(cfg: TrainConfig, uri: str, source: ModelSource,
                       outcome: EvalOutcome) -> None:
    """With ``mlflow.register_model``: the evaluated model as an MLflow model in the eval run,
    registered as a new version with these metrics (and the generic prompts the evaluation
    built, which the model then serves)."""
    if not cfg.mlflow.register_model:
        return
    from dinor1.registry import log_model

    prompts = sorted(outcome.out_dir.rglob(PROMPTS_FILE))
    log_model(source.path, run_id=outcome.run_id, tracking_uri=uri, metrics=outcome.metrics,
              register_as=cfg.mlflow.register_model, alias=cfg.mlflow.register_alias,
              generic_prompts=prompts[0] if len(prompts) == 1 else None)


def _artifact_dir(prefix: str, path: Path, outcome: EvalOutcome) -> str:
    """``prefix`` plus the file's sub-folder of the output folder (ODinW: the dataset)."""
    rel = path.parent.relative_to(outcome.out_dir).as_posix()
    return prefix if rel == "." else f"{prefix}/{rel}"


def log_eval_run(cfg: TrainConfig, uri: str, source: ModelSource, outcome: EvalOutcome) -> str:
    """A new MLflow run holding the metrics and artifacts, linked to its training run by tag."""
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(uri)
    experiment = experiment_id(client, cfg.mlflow.experiment, uri, resolve_paths(cfg)[0])
    tags = {"dinor1.run_kind": "eval", "dinor1.checkpoint": source.path}
    if source.train_run_id:
        tags["dinor1.train_run_id"] = source.train_run_id
        tags["mlflow.parentRunId"] = source.train_run_id
    base = cfg.mlflow.run_name or Path(source.path).parent.name or "model"
    run = client.create_run(experiment, run_name=f"eval-{base}", tags=tags)
    params = {f"eval.{k}": str(v)[:500] for k, v in cfg.eval.model_dump(mode="json").items()}
    params["eval.shards_resolved"] = str(cfg.eval.shards or cfg.data.val_shards)[:500]
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, v, now, 0) for k, v in outcome.metrics.items()],
                     params=[Param(k, v) for k, v in params.items()])
    for result in outcome.modes.values():
        for path in result.files:
            client.log_artifact(run.info.run_id, str(path), _artifact_dir("eval", path, outcome))
    for path in sorted(outcome.out_dir.rglob(PROMPTS_FILE)):  # one per dataset for ODinW
        client.log_artifact(run.info.run_id, str(path), _artifact_dir("prompts", path, outcome))
    for path in sorted(outcome.out_dir.rglob(SKIPPED_FILE)):  # one per dataset for ODinW
        client.log_artifact(run.info.run_id, str(path), _artifact_dir("eval", path, outcome))
    client.log_artifact(run.info.run_id, str(outcome.out_dir / "metrics.json"), "eval")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
