"""The driver side of ``dinor1 train``: config -> datasets, MLflow run, TorchTrainer.fit()."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from dinor1 import storage as store
from dinor1.config import TrainConfig, experiment_id, resolve_paths  # noqa: F401 (re-exported)
from dinor1.errors import UserError
from dinor1.storage import join
from dinor1.train.checkpoints import latest_checkpoint
from dinor1.train.settings import WorkerSettings


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_run(cfg: TrainConfig, storage: Path | str, name: str, uri: str,
               tags: dict[str, str] | None = None) -> str:
    """Create (or, for a resumed run folder, reuse) the MLflow run; returns its id. ``tags``
    go on a new run (e.g. ``mlflow.parentRunId``: a sweep's trial under its sweep's run)."""
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
        "ray": ray.__version__, "python": sys.version.split()[0], **(tags or {})})
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


FINISHED = "finished"  # written into the run folder when fit() returned without an error
# settings that may differ between attempts of one run without being a change of settings
RERUN_IGNORED = ("checkpointing.resume",)


def start_or_join_ray(address: str | None = None) -> bool:
    """Join the Ray cluster named by ``address``, ``RAY_ADDRESS`` or left by ``ray start`` on
    this machine (``ray.init()``'s own rule) with Ray's settings as they are; with none of
    them, start a Ray of this process on 127.0.0.1 only. True when started here."""
    import ray
    from ray._private import services

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS") or services.find_bootstrap_address(None):
        ray.init(address=address, configure_logging=False)
        return False
    from dinor1.local_cluster import loopback_only_ray

    loopback_only_ray()
    # one machine, nothing to be preempted: no preemption watcher actor (a process per run, and
    # a C++ error line about its restart arguments on the console)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(configure_logging=False)
    return True


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(stored: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """``key: old -> new`` for each setting (dotted key) that differs, sorted by key. A key the
    stored config lacks (written by an older dinor1, before the key existed) is unchanged when
    its current value is its default in ``defaults`` (the schema's, as a nested dict)."""
    old, new, default = _flat(stored), _flat(current), _flat(defaults or {})
    missing = object()

    def changed(key: str) -> bool:
        if key in RERUN_IGNORED or old.get(key, missing) == new.get(key, missing):
            return False
        return not (key not in old and key in default and new.get(key) == default[key])

    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
            for key in sorted(old.keys() | new.keys()) if changed(key)]


def check_rerun(cfg: TrainConfig, storage: Path | str, name: str) -> list[str]:
    """Refuse (one line) to re-enter the run folder ``storage/name`` with other settings than
    it keeps in ``resolved_config.yaml``, or a finished run, unless ``checkpointing.resume``;
    returns the changed settings a resumed run continues with. A run that stopped before the
    end with the same settings resumes (Ray Train's behaviour)."""
    stored_file = join(storage, name, "resolved_config.yaml")
    if not store.exists(stored_file):
        return []
    try:
        stored = yaml.safe_load(store.read_text(stored_file)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{stored_file}: unreadable ({str(exc).splitlines()[0]}); "
                        "pick a new checkpointing.name") from None
    changes = config_changes(stored, cfg.model_dump(mode="json"),
                             TrainConfig().model_dump(mode="json"))
    if cfg.checkpointing.resume:
        return changes
    if changes:
        shown = ", ".join(changes[:6]) + (f", {len(changes) - 6} more" if len(changes) > 6 else "")
        raise UserError(f"run {name} exists in {storage} with other settings ({shown}); pick a "
                        "new checkpointing.name or set checkpointing.resume=true to continue it "
                        "with these")
    if store.exists(join(storage, name, FINISHED)) or store.exists(join(storage, name,
                                                                        "final_model")):
        raise UserError(f"run {name} in {storage} is finished; set checkpointing.resume=true to "
                        "continue it, or pick a new checkpointing.name to train again")
    return []


def _record_attempt(cfg: TrainConfig, storage: Path | str, name: str, uri: str, run_id: str,
                    changes: list[str], started_here: bool) -> None:
    """The run folder keeps the settings of its latest attempt; MLflow gets the changes a
    resume made (its params keep the first attempt's values) and the Ray the driver used."""
    import mlflow
    import ray

    tags = {"dinor1.ray": json.dumps({
        "gcs_address": ray.get_runtime_context().gcs_address,
        "driver_node_ip": ray.util.get_node_ip_address(), "started_here": started_here,
        "loopback_only": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"})}
    if changes:
        resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        store.write_text(join(storage, name, "resolved_config.yaml"), resolved)
        tags["dinor1.resumed_with"] = ", ".join(changes)  # the latest attempt's changes
        print(f"[train] resuming {name} with changed settings: {', '.join(changes)}",
              file=sys.stderr)
    try:
        client = mlflow.MlflowClient(uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value[:5000])
    except Exception as exc:  # noqa: BLE001 - a tag is not worth stopping the run for
        print(f"[train] MLflow tags not set ({type(exc).__name__}: {str(exc)[:200]})",
              file=sys.stderr)


def _connection_refused(uri: str) -> str | None:
    """For an http(s) tracking URI whose host refuses a TCP connection to its port: why, in a
    few words. None otherwise (another scheme, a server that accepts, or any other failure,
    which MLflow's own requests then report)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except ConnectionRefusedError:
        return f"connection refused by {parts.hostname}:{port}"
    except (OSError, ValueError):
        return None
    return None


def _start_mlflow_run(cfg: TrainConfig, storage: Path | str, name: str, uri: str,
                      tags: dict[str, str] | None = None) -> str:
    """The run's MLflow run id; a tracking server that does not answer stops here, in one line.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # seconds, not minutes
    refused = _connection_refused(uri)
    if refused:  # (nothing listens: no point in MLflow's retries and their back-off)
        raise UserError(f"mlflow.tracking_uri {uri}: the tracking server does not answer "
                        f"({refused}); nothing was started")
    try:
        return mlflow_run(cfg, storage, name, uri, tags)
    except Exception as exc:  # noqa: BLE001 - MLflow wraps connection errors in its own type
        from dinor1.train.mlflow_writer import one_line, rejected

        if rejected(exc) or isinstance(exc, (UserError, OSError)):
            raise
        raise UserError(f"mlflow.tracking_uri {uri}: the tracking server does not answer "
                        f"({one_line(exc)[:200]}); nothing was started") from exc


def _steps_per_epoch(cfg: TrainConfig, manifest: dict | None) -> int | None:
    """Optimiser steps per epoch when the shards say how many samples they hold (or the cap)."""
    per_epoch = None
    if manifest:  # (an elastic range: at its full size)
        workers = cfg.scaling.max_workers or cfg.scaling.num_workers
        per_epoch = manifest["num_samples"] // (cfg.data.batch_size * workers)
    if cfg.stages.max_steps_per_epoch:
        per_epoch = min(per_epoch or cfg.stages.max_steps_per_epoch,
                        cfg.stages.max_steps_per_epoch)
    return per_epoch


def _datasets(cfg: TrainConfig, shards) -> tuple[dict, list[dict]]:
    """Ray Datasets for the workers (train; val and support with ``eval.every_epochs``) and
    the val split's categories."""
    from dinor1.data.pipeline import detection_dataset, open_shard_set

    datasets = {"train": detection_dataset(shards, cfg.data, train=True)}
    if not cfg.eval.every_epochs:
        return datasets, []
    from dinor1.eval.evaluate import dataset_categories

    val = open_shard_set(cfg.eval.shards or cfg.data.val_shards)
    categories = dataset_categories(val.manifest)
    if not categories:
        raise UserError("eval.every_epochs: the val shards have no manifest.json (classes)")
    datasets["val"] = detection_dataset(val, cfg.data, train=False)
    datasets["support"] = detection_dataset(cfg.eval.support_shards or shards, cfg.data,
                                            train=False)
    return datasets, categories


def _trainer(cfg: TrainConfig, settings: WorkerSettings, datasets: dict, storage, name: str,
             callbacks: list | tuple = ()):
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from dinor1.console import is_verbose, worker_env
    from dinor1.train.loop import train_loop_per_worker

    sc = cfg.scaling
    workers = (sc.min_workers, sc.max_workers) if sc.min_workers else sc.num_workers
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings.for_ray(),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=sc.use_gpu, placement_strategy=sc.placement_strategy,
            elastic_resize_monitor_interval_s=sc.resize_check_seconds,
            resources_per_worker={"CPU": sc.cpus_per_worker,
                                  **({"GPU": sc.gpus_per_worker or 1} if sc.use_gpu else {}),
                                  **sc.resources_per_worker}),
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
            failure_config=FailureConfig(max_failures=cfg.checkpointing.max_failures),
            # quiet unless --verbose (dinor1/console.py): Ray Train's INFO logs (worker group
            # start, each TrainingReport) stay in Ray's log files
            logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
            worker_runtime_env={"env_vars": worker_env()}, callbacks=list(callbacks)),
    )


@contextlib.contextmanager
def _start_timeout(seconds: float | None):
    """``scaling.start_timeout_seconds`` as Ray Train's own variable, which it hands from this
    driver to its controller (and nothing else reads it); the old value back afterwards."""
    if seconds is None:
        yield
        return
    name, before = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", os.environ.get(
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    os.environ[name] = f"{seconds:g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _log_final_model(cfg: TrainConfig, final_dir: str, run_id: str, uri: str) -> None:
    """The final model as an MLflow model in the run, registered when ``mlflow.register_model``
    names it, the run's last evaluation metrics on it. A tracking server down now costs the
    logging only (one line), not the run: the model is in the run folder."""
    import mlflow

    from dinor1.registry import log_model
    from dinor1.train.mlflow_writer import one_line

    try:
        metrics = {k: v for k, v in mlflow.MlflowClient(uri).get_run(run_id).data.metrics.items()
                   if k.startswith("eval/")}
        log_model(final_dir, run_id=run_id, tracking_uri=uri, metrics=metrics,
                  register_as=cfg.mlflow.register_model, alias=cfg.mlflow.register_alias,
                  log=lambda line: print(line, file=sys.stderr))
    except Exception as exc:  # noqa: BLE001 - whatever MLflow raises: the run itself is done
        print(f"[mlflow] the final model was not logged to MLflow ({one_line(exc)[:300]}); it "
              f"is in {final_dir}", file=sys.stderr)


def run_training(cfg: TrainConfig, *, ray_address: str | None = None,
                 tags: dict[str, str] | None = None, callbacks: list | tuple = ()):
    """Start (or resume) the job; returns Ray Train's Result. ``tags``: on a new MLflow run;
    ``callbacks``: Ray Train user callbacks (a sweep's trial forwards reports to Ray Tune)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from dinor1.config import local_output_dir
    from dinor1.console import is_verbose, quiet_ray_data
    from dinor1.data.pipeline import open_shard_set

    if is_verbose():  # (always kept: <run folder>/resolved_config.yaml and an MLflow artifact)
        print("resolved config:\n" + yaml.safe_dump(cfg.model_dump(mode="json"),
                                                    sort_keys=False), file=sys.stderr)
    quiet_ray_data()
    shards = open_shard_set(cfg.data.train_shards)  # fails early on a missing shard folder
    storage, name, uri = resolve_paths(cfg)
    changed = check_rerun(cfg, storage, name)  # one-line refusal before anything starts
    if isinstance(storage, Path):
        storage.mkdir(parents=True, exist_ok=True)
    run_id = _start_mlflow_run(cfg, storage, name, uri, tags)
    started_here = start_or_join_ray(ray_address)
    _record_attempt(cfg, storage, name, uri, run_id, changed, started_here)
    per_epoch = _steps_per_epoch(cfg, shards.manifest)
    datasets, eval_categories = _datasets(cfg, shards)
    settings = WorkerSettings(
        train=cfg, mlflow_run_id=run_id, tracking_uri=uri,
        total_steps=per_epoch * (cfg.stages.sft_epochs + cfg.stages.grqo_epochs)
        if per_epoch else None,
        run_folder=join(storage, name), final_model_dir=join(storage, name, "final_model"),
        mlflow_spool_dir=str(local_output_dir(storage, name, "mlflow_spool")),
        eval_categories=eval_categories,
        # Ray Train V2 has no resume_from_checkpoint: the loop loads it
        start_from=str(latest_checkpoint(cfg.checkpointing.start_from))
        if cfg.checkpointing.start_from else None,
        class_names=contrastive_class_names(cfg, shards.manifest))
    with _start_timeout(cfg.scaling.start_timeout_seconds):
        result = _trainer(cfg, settings, datasets, storage, name, callbacks).fit()
    if result.error is None:
        store.write_text(join(storage, name, FINISHED), f"{run_id}\n")
        if cfg.mlflow.log_model and run_id:
            _log_final_model(cfg, settings.final_model_dir, run_id, uri)
    print(f"[train {name}] {'finished' if result.error is None else 'failed'}: run folder "
          f"{join(storage, name)} (checkpoints, final_model, resolved_config.yaml); MLflow run "
          f"{run_id} at {uri}", file=sys.stderr)
    return result
