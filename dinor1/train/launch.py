"""The driver side of ``dinor1 train``: config -> datasets, MLflow run, TorchTrainer.fit()."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from dinor1.config import TrainConfig, experiment_id, resolve_paths  # noqa: F401 (re-exported)
from dinor1.errors import UserError
from dinor1.storage import join
from dinor1.train.checkpoints import latest_checkpoint


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_run(cfg: TrainConfig, storage: Path | str, name: str, uri: str) -> str:
    """Create (or, for a resumed run folder, reuse) the MLflow run; returns its id."""
    import mlflow

    import dinor1
    from dinor1 import storage as store
    from dinor1.train.tracking import flatten

    run_file = store.join(storage, name, "mlflow_run_id")
    client = mlflow.MlflowClient(uri)
    if store.exists(run_file):
        return store.read_text(run_file).strip()
    experiment = experiment_id(client, cfg.mlflow.experiment, uri, storage)
    import ray
    import torch

    run = client.create_run(experiment, run_name=cfg.mlflow.run_name or name, tags={
        "git_commit": _git_commit(), "dinor1": dinor1.__version__, "torch": torch.__version__,
        "ray": ray.__version__, "python": sys.version.split()[0]})
    params = flatten(cfg.model_dump(mode="json"))
    items = list(params.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    store.write_text(store.join(storage, name, "resolved_config.yaml"), resolved)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "resolved_config.yaml").write_text(resolved)
        client.log_artifact(run.info.run_id, str(Path(folder) / "resolved_config.yaml"))
    store.write_text(run_file, run.info.run_id)
    return run.info.run_id


def _ordered(*names: str) -> dict:
    """Ray Train ingest options: ``names`` read in order, the rest as Ray Train's defaults."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return {name: options for name in names}


def contrastive_class_names(cfg: TrainConfig, manifest: dict | None) -> dict[str, str] | None:
    """The train shards' class names when the visual-text contrastive loss is on, else None.

    ``objectives.contrastive``: true needs the names (a one-line error without them); "auto" is
    on for a pretrained checkpoint (not a random-init preset, whose text encoder is noise) whose
    shards name their classes; false never.
    """
    from dinor1.model.presets import PRESETS

    mode = cfg.objectives.contrastive
    names = {str(k): v for k, v in (manifest or {}).get("categories", {}).items()}
    if mode is False or (mode == "auto" and cfg.model.init in PRESETS):
        return None
    if not names:
        if mode is True:
            raise UserError("objectives.contrastive=true needs class names: the train shards "
                            "have no manifest.json with categories")
        return None
    return names


def run_training(cfg: TrainConfig, *, ray_address: str | None = None):
    """Start (or resume) the job; returns Ray Train's Result."""
    address = ray_address or os.environ.get("RAY_ADDRESS") or ""
    if not address or address.split("://")[-1].startswith(("127.0.0.1", "localhost")):
        # a Ray this process starts itself, or a loopback cluster: Ray's local-only mode keeps
        # every address on 127.0.0.1. A driver joining a remote multi-node cluster keeps Ray's
        # default (the cluster configs set the variable to 1 on their nodes and jobs).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dinor1.config import local_output_dir
    from dinor1.data.pipeline import detection_dataset, open_shard_set
    from dinor1.train.loop import train_loop_per_worker

    print("resolved config:\n" + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
          file=sys.stderr)
    shards = open_shard_set(cfg.data.train_shards)  # fails early on a missing shard folder
    storage, name, uri = resolve_paths(cfg)
    if isinstance(storage, Path):
        storage.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # seconds, not minutes
    try:
        run_id = mlflow_run(cfg, storage, name, uri)
    except Exception as exc:  # noqa: BLE001 - MLflow wraps connection errors in its own type
        from dinor1.train.tracking import one_line, rejected

        if rejected(exc) or isinstance(exc, (UserError, OSError)):
            raise
        raise UserError(f"mlflow.tracking_uri {uri}: the tracking server does not answer "
                        f"({one_line(exc)[:200]}); nothing was started") from exc
    if not ray.is_initialized():
        ray.init(address=ray_address, configure_logging=False)
    sc = cfg.scaling
    workers = (sc.min_workers, sc.max_workers) if sc.min_workers else sc.num_workers
    per_epoch = None
    if shards.manifest:
        per_epoch = shards.manifest["num_samples"] // (cfg.data.batch_size * sc.num_workers)
    if cfg.stages.max_steps_per_epoch:
        per_epoch = min(per_epoch or cfg.stages.max_steps_per_epoch,
                        cfg.stages.max_steps_per_epoch)
    epochs = cfg.stages.sft_epochs + cfg.stages.grqo_epochs
    datasets = {"train": detection_dataset(shards, cfg.data, train=True)}
    eval_categories = []
    if cfg.eval.every_epochs:
        from dinor1.eval.evaluate import dataset_categories

        val = open_shard_set(cfg.eval.shards or cfg.data.val_shards)
        eval_categories = dataset_categories(val.manifest)
        if not eval_categories:
            raise UserError("eval.every_epochs: the val shards have no manifest.json (classes)")
        datasets["val"] = detection_dataset(val, cfg.data, train=False)
        support = detection_dataset(cfg.eval.support_shards or shards, cfg.data, train=False)
        datasets["support"] = support
    class_names = contrastive_class_names(cfg, shards.manifest)
    start = None  # Ray Train V2 has no resume_from_checkpoint: the loop loads it
    if cfg.checkpointing.start_from:
        start = str(latest_checkpoint(cfg.checkpointing.start_from))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"), "mlflow_run_id": run_id, "tracking_uri": uri,
            "total_steps": per_epoch * epochs if per_epoch else None,
            "run_folder": join(storage, name),
            "final_model_dir": join(storage, name, "final_model"),
            # rank 0 keeps what it logs during an MLflow outage here (see tracking.MlflowWriter)
            "mlflow_spool_dir": str(local_output_dir(storage, name, "mlflow_spool")),
            "eval_categories": eval_categories, "start_from": start,
            "class_names": class_names,  # {id: name} for the contrastive loss, or None
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=sc.use_gpu, placement_strategy=sc.placement_strategy,
            resources_per_worker={"CPU": sc.cpus_per_worker,
                                  **({"GPU": sc.gpus_per_worker or 1} if sc.use_gpu else {})}),
        datasets=datasets,
        # the support set goes whole to every worker; train and val are split between them
        dataset_config=DataConfig(datasets_to_split=["train", "val"],
                                  # every rank builds the same generic prompts from support
                                  execution_options=_ordered(
                                      "support", *(["train"] if cfg.data.preserve_order else []))),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpointing.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.checkpointing.max_failures)),
    )
    result = trainer.fit()
    print(f"[train] MLflow run {run_id} at {uri}; checkpoints in {join(storage, name)}",
          file=sys.stderr)
    return result
