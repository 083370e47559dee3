"""``dinor1 sweep SWEEP.yaml``: a Ray Tune search over a training job's settings.

A sweep file names a job (``jobs/demo.yaml`` or a packaged job), the settings every run gets,
and what varies::

    name: grqo-small                 # the sweep's folder, its MLflow parent run, its trials' prefix
    job: demo                        # a job YAML path or packaged job name
    overrides: {stages.max_steps_per_epoch: 50}  # every run of the sweep (or [key=value, ...])
    seeds: [0, 1, 2]                 # a grid dimension: seed and data.seed of a trial
    prefix_sft_epochs: 3             # optional: per seed, one SFT run of 3 epochs that every
                                     # trial of that seed branches from (the demo's pattern)
    variants:                        # a grid dimension of named override sets
      sft:  {stages.sft_epochs: 5, stages.grqo_epochs: 0}
      grqo: {}
    baseline: sft                    # paired differences (same seed) against this variant
    space:                           # Ray Tune distributions over any config keys
      grqo.beta: {grid: [0.0, 0.04]}
      grqo.alpha: {loguniform: [0.001, 0.1]}
    eval_splits: {test: data/shards/test}   # scored at the end too, as test/<mode>/<metric>
    search: {metric: eval/generic/AP, mode: max, scheduler: asha, num_samples: 1}

Each trial is a real ``dinor1 train`` run (Ray Train + DeepSpeed inside the Tune trial, the
trial itself asking for no CPU) whose MLflow run is a child of the sweep's run, then scored with
``dinor1 eval`` on the val split (``eval/...``) and each of ``eval_splits``; Tune gets those
metrics as the trial's result. With ``scheduler: asha`` the trials evaluate on the val split
every epoch (``eval.every_epochs: 1``) and ASHA stops the weak ones early (their MLflow runs end
KILLED). Trials run as many at a time as the cluster's CPUs (and GPUs) fit
(``search.max_concurrent_trials``, default: that count), so the same file runs one trial at a
time on a laptop and many on a cluster. Running the same command again resumes an interrupted
sweep (Ray Tune's restore): finished trials are kept, unfinished ones resume from their newest
checkpoint. ``dinor1 compare --sweep NAME`` tabulates it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from dinor1.config import StrictModel, TrainConfig, load_yaml, validate
from dinor1.errors import UserError

SWEEP_TAG = "dinor1.sweep"  # on the parent, every prefix and every trial run: the sweep's name
ROLE_TAG = "dinor1.sweep_role"  # "sweep", "prefix" or "trial"
VARIANT_TAG, SEED_TAG, PARAMS_TAG = "dinor1.sweep_variant", "dinor1.sweep_seed", \
    "dinor1.sweep_params"
STOPPED_TAG = "dinor1.sweep_stopped"  # a trial the scheduler stopped early: why
EPOCHS_DONE = "train/epochs_done"  # Tune's time attribute (ASHA's rungs are epochs)
COMPLETE = "sweep/complete"  # in the result of a trial that trained and was scored to the end
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
# what a trial's own actor asks for: no CPU (its Ray Train workers and Ray Data ask for theirs;
# a CPU held by the idle trial actor would starve Ray Data on a 2-core machine), and Tune needs
# some non-zero request
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SearchSection(StrictModel):
    """What Tune optimises and how it schedules trials."""

    metric: str = "eval/generic/AP"  # a trial's result key (val split, or test/... splits)
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, gt=0)  # asha: epochs every trial trains before it may stop
    reduction_factor: float = Field(2.0, gt=1)  # asha: 1/this of the trials go on at each rung
    num_samples: int = Field(1, gt=0)  # draws of the random keys (the grid repeated as often)
    # trials at a time; none: as many as the cluster's CPUs (and GPUs) fit now
    max_concurrent_trials: int | None = Field(None, gt=0)


class SweepSpec(StrictModel):
    """A sweep file (see the module docstring)."""

    name: str
    job: str
    overrides: dict[str, Any] | list[str] = Field(default_factory=list)
    storage_path: str | None = None  # default: the job's checkpointing.storage_path
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    prefix_sft_epochs: int | None = Field(None, gt=0)
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"default": {}},
                                                min_length=1)
    baseline: str | None = None
    space: dict[str, dict[str, list]] = Field(default_factory=dict)
    eval_splits: dict[str, str] = Field(default_factory=dict)
    search: SearchSection = Field(default_factory=SearchSection)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("letters, digits, '_', '.' and '-' only (it names folders and runs)")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"variant {name!r}: letters, digits, '_', '.' and '-' only")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(s < 0 for s in value):
            raise ValueError("seeds must be distinct and >= 0")
        return value

    @field_validator("space")
    @classmethod
    def _space(cls, value: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
        for key, dist in value.items():
            if key in ("seed", "data.seed"):
                raise ValueError(f"{key}: seeds are the 'seeds' list (paired across variants)")
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: one of {', '.join(DISTRIBUTIONS)} with its "
                                 "arguments, e.g. {grid: [0.0, 0.04]} or {uniform: [0, 1]}")
            kind, args = next(iter(dist.items()))
            if kind in ("grid", "choice") and not args:
                raise ValueError(f"{key}: {kind} needs at least one value")
            if kind in ("uniform", "loguniform", "randint") and len(args) != 2:
                raise ValueError(f"{key}: {kind} takes [low, high]")
            if kind == "quniform" and len(args) != 3:
                raise ValueError(f"{key}: quniform takes [low, high, q]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants "
                             f"({', '.join(self.variants)})")
        for split in self.eval_splits:
            if not _NAME.match(split) or split == "eval":
                raise ValueError(f"eval_splits: {split!r} is no valid split name")
        return self

    def override_list(self) -> list[str]:
        """``overrides`` as ``key=value`` strings (a mapping's values written as YAML)."""
        if isinstance(self.overrides, dict):
            return [f"{k}={_yaml_value(v)}" for k, v in self.overrides.items()]
        return list(self.overrides)

    def grid_size(self) -> int:
        """Trials per sample of the random keys: variants x seeds x grid points."""
        size = len(self.variants) * len(self.seeds)
        for dist in self.space.values():
            if "grid" in dist:
                size *= len(dist["grid"])
        return size


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep file -> a validated :class:`SweepSpec` (a one-line error naming the key)."""
    data = load_yaml(path)
    try:
        return validate(SweepSpec, data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _yaml_value(value: Any) -> str:
    """A value as override text that the config loader reads back as that value."""
    return json.dumps(value)


@dataclass
class SweepPlan:
    """What every trial needs, resolved by the driver (picklable, sent to the trials)."""

    spec: dict
    job_path: str
    storage: str  # the sweep's folder: <storage_path>/<name>
    tracking_uri: str
    experiment: str
    parent_run_id: str
    prefixes: dict[int, str] = field(default_factory=dict)  # seed -> checkpoint to branch from
    asha: bool = False

    @property
    def sweep(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec)


def trial_label(variant: str, seed: int, params: dict[str, Any]) -> str:
    """A trial's readable name: its variant, the swept keys' last parts and values, its seed."""
    parts = [variant]
    for key, value in sorted(params.items()):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={shown}")
    parts.append(f"s{seed}")
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", "-".join(parts))


def trial_overrides(plan: SweepPlan, variant: str, seed: int, params: dict[str, Any],
                    label: str) -> list[str]:
    """The overrides of one trial on top of the job file, in order (the later wins): the
    sweep's, the variant's, the swept keys', then seed, names, paths and the branch point."""
    spec = plan.sweep
    out = spec.override_list()
    out += [f"{k}={_yaml_value(v)}" for k, v in spec.variants[variant].items()]
    out += [f"{k}={_yaml_value(v)}" for k, v in params.items()]
    out += [f"seed={seed}", f"data.seed={seed}", f"mlflow.run_name={spec.name}-{label}",
            "checkpointing.name=null", f"checkpointing.storage_path={plan.storage}/trials",
            f"mlflow.tracking_uri={plan.tracking_uri}", f"mlflow.experiment={plan.experiment}"]
    if plan.asha:
        out.append("eval.every_epochs=1")
    if seed in plan.prefixes:
        out.append(f"checkpointing.start_from={plan.prefixes[seed]}")
    return out


def _tags(plan: SweepPlan, role: str, **extra: str) -> dict[str, str]:
    return {"mlflow.parentRunId": plan.parent_run_id, SWEEP_TAG: plan.sweep.name,
            ROLE_TAG: role, **extra}


def _base_overrides(plan: SweepPlan) -> list[str]:
    spec = plan.sweep
    return [*spec.override_list(), f"checkpointing.storage_path={plan.storage}",
            f"mlflow.tracking_uri={plan.tracking_uri}", f"mlflow.experiment={plan.experiment}",
            "checkpointing.name=null"]


def trial_config(plan: SweepPlan, variant: str, seed: int, params: dict[str, Any]
                 ) -> tuple[TrainConfig, str]:
    """(the trial's validated training config, its label)."""
    from dinor1.config import load_train_config

    label = trial_label(variant, seed, params)
    try:
        cfg = load_train_config(plan.job_path, trial_overrides(plan, variant, seed, params,
                                                               label))
    except UserError as exc:
        raise UserError(f"sweep {plan.sweep.name}, trial {label}: {exc}") from None
    prefix = plan.sweep.prefix_sft_epochs
    if prefix and cfg.stages.sft_epochs < prefix:
        raise UserError(f"sweep {plan.sweep.name}, variant {variant}: stages.sft_epochs="
                        f"{cfg.stages.sft_epochs} is less than prefix_sft_epochs={prefix} "
                        "(a trial branches from the prefix's last epoch)")
    return cfg, label


# ---------------------------------------------------------------------------------------------
# the trial (runs in a Ray Tune trial actor)


def eval_to_tune(metric: str):
    """A Ray Train callback forwarding the workers' evaluation reports (rank 0's metrics; only
    reports that carry ``metric``) to the Tune trial, so that ASHA decides on them."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                self._training_actor_item_queue.put(dict(metrics[0]))

    return EvalToTune()


def score_model(cfg: TrainConfig, run_folder: str, splits: dict[str, str]) -> dict[str, float]:
    """``dinor1 eval`` of a run's final model on the val split (``eval/...``) and on each of
    ``splits`` (``<split>/...``); returns the metrics (also logged into the run)."""
    from dinor1.eval.evaluate import evaluate

    metrics: dict[str, float] = {}
    for split, shards in {"eval": None, **splits}.items():
        update = {"checkpoint": run_folder, "out_dir": str(Path(run_folder) / f"{split}_eval")}
        if shards is not None:
            update["shards"] = shards
        scored = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=update)})
        outcome = evaluate(scored, log_mlflow=False)
        metrics.update({f"{split}/{k.split('/', 1)[1]}": v for k, v in outcome.metrics.items()
                        if k.startswith("eval/")})
    return metrics


def _log_final(uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """``metrics`` into the trial's run at its last training step (MLflow's latest value of a
    metric is the one of the highest step: these outrank what evaluations during training
    logged under the same names)."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    steps = [m.step for m in client.get_metric_history(run_id, "loss/total")]
    step = max(steps, default=0) + 1
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


def run_trial(config: dict, plan: SweepPlan) -> None:
    """One trial: train (or resume) its run, score its final model, report to Tune."""
    import ray.tune

    from dinor1 import storage as store
    from dinor1.config import resolve_paths
    from dinor1.train.launch import FINISHED, run_training

    variant, seed, params = config["variant"], int(config["seed"]), dict(config.get("params",
                                                                                    {}))
    cfg, label = trial_config(plan, variant, seed, params)
    storage, name, uri = resolve_paths(cfg)
    folder = store.join(storage, name)
    if not store.exists(store.join(folder, FINISHED)):  # (a restored sweep: trained already)
        tags = _tags(plan, "trial", **{VARIANT_TAG: variant, SEED_TAG: str(seed),
                                       PARAMS_TAG: json.dumps(params, sort_keys=True)})
        callbacks = [eval_to_tune(plan.sweep.search.metric)] if plan.asha else []
        result = run_training(cfg, tags=tags, callbacks=callbacks)
        if result.error is not None:
            raise RuntimeError(f"trial {label}: training failed: {result.error}")
    run_id = store.read_text(store.join(folder, "mlflow_run_id")).strip()
    metrics = score_model(cfg, str(folder), plan.sweep.eval_splits)
    epochs = cfg.stages.sft_epochs + cfg.stages.grqo_epochs
    _log_final(uri, run_id, metrics)
    shown = [k for k in metrics if k.count("/") >= 2
             and k.split("/", 2)[2] in ("AP", "AP50", "novel/AP", "APr")]
    print(f"[sweep] trial {label}: " + ", ".join(
        f"{k.split('/')[0]} {k.split('/', 2)[2]} {metrics[k]:.3f}" for k in shown),
        file=sys.stderr, flush=True)
    ray.tune.report({**metrics, EPOCHS_DONE: float(epochs), COMPLETE: 1.0,
                     "run_id": run_id, "label": label})


# ---------------------------------------------------------------------------------------------
# the driver


def _param_space(spec: SweepSpec) -> dict:
    from ray import tune

    def dist(kind: str, args: list):
        if kind == "grid":
            return tune.grid_search(list(args))
        if kind == "choice":
            return tune.choice(list(args))
        if kind == "quniform":
            return tune.quniform(*args)
        return getattr(tune, kind)(*args)

    return {"variant": tune.grid_search(list(spec.variants)),
            "seed": tune.grid_search(list(spec.seeds)),
            "params": {key: dist(*next(iter(d.items()))) for key, d in spec.space.items()}}


def concurrent_trials(spec: SweepSpec, cfg: TrainConfig) -> int:
    """``search.max_concurrent_trials``, or as many trials as the cluster's CPUs (and GPUs) fit
    now: each trial's workers plus one CPU for its data pipeline and evaluation."""
    import ray

    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    sc = cfg.scaling
    workers = sc.max_workers or sc.num_workers
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // (workers * sc.cpus_per_worker + 1))
    if sc.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // workers))
    return max(1, fits)


def _parent_run(spec: SweepSpec, sweep_file: Path, folder: Path, uri: str,
                experiment: str) -> str:
    """The sweep's MLflow run (created once; its id kept in the sweep folder)."""
    import mlflow

    from dinor1.config import experiment_id

    id_file = folder / "mlflow_parent_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id(client, experiment, uri, folder.parent),
                            run_name=spec.name, tags={SWEEP_TAG: spec.name, ROLE_TAG: "sweep",
                                                      "dinor1.run_kind": "sweep"})
    params = {"sweep.job": spec.job, "sweep.seeds": json.dumps(spec.seeds),
              "sweep.variants": json.dumps(list(spec.variants)),
              "sweep.space": json.dumps(spec.space)[:6000],
              "sweep.metric": spec.search.metric, "sweep.scheduler": spec.search.scheduler,
              "sweep.baseline": str(spec.baseline),
              "sweep.prefix_sft_epochs": str(spec.prefix_sft_epochs)}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.log_artifact(run.info.run_id, str(sweep_file))
    id_file.write_text(run.info.run_id)
    return run.info.run_id


def _check_same_sweep(spec: SweepSpec, folder: Path) -> None:
    """A sweep folder keeps its sweep's settings: another sweep of the same name is refused."""
    stored = folder / "sweep.yaml"
    current = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=True)
    if stored.is_file() and stored.read_text() != current:
        old = yaml.safe_load(stored.read_text()) or {}
        changed = sorted(k for k in set(old) | set(spec.model_dump(mode="json"))
                         if old.get(k) != spec.model_dump(mode="json").get(k))
        raise UserError(f"sweep {spec.name} exists in {folder} with other settings "
                        f"({', '.join(changed)} differ); rename the sweep to start another, or "
                        "restore the file to resume it")
    folder.mkdir(parents=True, exist_ok=True)
    stored.write_text(current)


def _train_prefixes(plan: SweepPlan, log) -> dict[int, str]:
    """Per seed, the SFT prefix run every trial of that seed branches from (kept across
    restarts: a finished prefix is reused, an interrupted one resumes)."""
    from dinor1 import storage as store
    from dinor1.config import load_train_config, resolve_paths
    from dinor1.train.checkpoints import latest_checkpoint
    from dinor1.train.launch import FINISHED, run_training

    spec = plan.sweep
    out = {}
    for seed in spec.seeds:
        name = f"{spec.name}-sft-prefix-s{seed}"
        cfg = load_train_config(plan.job_path, [
            *_base_overrides(plan), f"seed={seed}", f"data.seed={seed}",
            f"mlflow.run_name={name}", f"stages.sft_epochs={spec.prefix_sft_epochs}",
            "stages.grqo_epochs=0", "eval.every_epochs=0", "mlflow.log_model=false"])
        storage, run, _ = resolve_paths(cfg)
        folder = store.join(storage, run)
        if store.exists(store.join(folder, FINISHED)):
            log(f"seed {seed}: SFT prefix {name} done already")
        else:
            log(f"seed {seed}: SFT prefix, {spec.prefix_sft_epochs} epochs ({name})")
            result = run_training(cfg, tags=_tags(plan, "prefix", **{SEED_TAG: str(seed)}))
            if result.error is not None:
                raise RuntimeError(f"SFT prefix {name} failed: {result.error}")
        out[seed] = str(latest_checkpoint(str(folder)))
    return out


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` returns."""

    name: str
    folder: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[dict]  # per trial: label, variant, seed, params, status, metrics
    minutes: float


def run_sweep(sweep_file: str | Path, *, ray_address: str | None = None,
              extra_overrides: tuple[str, ...] = ()) -> SweepOutcome:
    """Run (or resume) the sweep of ``sweep_file``; see the module docstring."""
    from ray import tune

    from dinor1.config import load_train_config, resolve_paths
    from dinor1.console import is_verbose
    from dinor1.submit import absolute_path
    from dinor1.train.launch import start_or_join_ray

    started = time.time()
    if not is_verbose():  # Tune's classic reporter, which verbose=0 silences (the new one's
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # tables and hints it does not)
    path = Path(sweep_file)
    spec = load_sweep(path)
    if extra_overrides:
        spec = spec.model_copy(update={"overrides": [*spec.override_list(), *extra_overrides]})
    job = _job_path(spec.job, path)
    base = load_train_config(job, spec.override_list())
    # trials run in Tune's trial folders: the job's relative paths are made absolute here
    spec = spec.model_copy(update={
        "overrides": [*spec.override_list(), *_absolute_paths(base)],
        "eval_splits": {k: absolute_path(v, Path.cwd()) for k, v in spec.eval_splits.items()}})
    storage_root = absolute_path(spec.storage_path or base.checkpointing.storage_path,
                                 Path.cwd())
    probe = load_train_config(job, [*spec.override_list(),
                                    f"checkpointing.storage_path={storage_root}"])
    storage, _, uri = resolve_paths(probe)
    if not isinstance(storage, Path):
        raise UserError("sweep storage_path: a local or shared folder (an object store is not "
                        "supported for sweeps yet)")
    folder = storage / spec.name
    _check_same_sweep(spec, folder)
    experiment = base.mlflow.experiment
    asha = spec.search.scheduler == "asha"
    if asha and base.data.val_shards is None and base.eval.shards is None:
        raise UserError("search.scheduler asha evaluates every epoch: the job needs "
                        "data.val_shards (or eval.shards)")

    def log(message: str) -> None:
        print(f"[sweep {(time.time() - started) / 60:4.1f} min] {message}", file=sys.stderr,
              flush=True)

    parent = _parent_run(spec, path, folder, uri, experiment)
    plan = SweepPlan(spec=spec.model_dump(mode="json"), job_path=str(job), storage=str(folder),
                     tracking_uri=uri, experiment=experiment, parent_run_id=parent, asha=asha)
    # every variant's config is valid before anything starts; ASHA's last rung is the longest's
    epochs = max(cfg.stages.sft_epochs + cfg.stages.grqo_epochs for cfg, _ in (
        trial_config(plan, variant, spec.seeds[0], _first_point(spec))
        for variant in spec.variants))
    if asha and spec.search.grace_period >= epochs:
        raise UserError(f"search.grace_period={spec.search.grace_period}: ASHA decides after "
                        f"whole epochs before the last (the longest trial trains {epochs}); "
                        "lower it, or use scheduler: fifo")
    start_or_join_ray(ray_address)
    if spec.prefix_sft_epochs:
        plan.prefixes = _train_prefixes(plan, log)
    concurrent = concurrent_trials(spec, base)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                                     TRIAL_RESOURCES)
    tune_dir = folder / "tune"
    total = spec.grid_size() * spec.search.num_samples
    if tune.Tuner.can_restore(str(tune_dir)):
        log(f"resuming the sweep's {total} trials from {tune_dir}")
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable,
                                   param_space=_param_space(spec), resume_errored=True)
    else:
        log(f"{total} trials, {concurrent} at a time, results in MLflow "
            f"({experiment}, run {spec.name})")
        tuner = tune.Tuner(trainable, param_space=_param_space(spec),
                           tune_config=_tune_config(spec, epochs, concurrent),
                           run_config=_tune_run_config(folder))
    results = tuner.fit()
    trials = _collect(results, plan)
    _finish_parent(plan, trials)
    minutes = (time.time() - started) / 60
    log(f"done: {sum(t['status'] == 'complete' for t in trials)} of {len(trials)} trials "
        f"complete in {minutes:.1f} min")
    return SweepOutcome(name=spec.name, folder=folder, tracking_uri=uri, experiment=experiment,
                        parent_run_id=parent, trials=trials, minutes=minutes)


def _absolute_paths(cfg: TrainConfig) -> list[str]:
    """Overrides making the job's relative local paths (shards, storage, a model folder)
    absolute against the current folder."""
    from dinor1.submit import PATH_KEYS, absolute_path

    out = []
    dumped = cfg.model_dump(mode="json")
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = dumped[section][name]
        if value is None or (key == "model.init" and not Path(str(value)).is_dir()):
            continue
        new = absolute_path(value, Path.cwd())
        if new != value:
            out.append(f"{key}={_yaml_value(new)}")
    return out


def _first_point(spec: SweepSpec) -> dict[str, Any]:
    """A value of every swept key (to validate the trials' configs before anything starts)."""
    point = {}
    for key, dist in spec.space.items():
        kind, args = next(iter(dist.items()))
        point[key] = args[0]
    return point


def _job_path(job: str, sweep_file: Path) -> Path:
    """The sweep's job: a path as given, else beside the sweep file, else a packaged job."""
    from dinor1.jobs_index import resolve_job

    beside = sweep_file.parent / job
    if not Path(job).exists() and beside.is_file():
        return beside.resolve()
    return resolve_job(job).resolve()


def _tune_config(spec: SweepSpec, epochs: int, concurrent: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.search.scheduler == "asha":
        # rungs before the last epoch only: a trial that trained to the end is scored, not
        # stopped
        scheduler = ASHAScheduler(time_attr=EPOCHS_DONE, max_t=max(epochs - 1, 1),
                                  grace_period=spec.search.grace_period,
                                  reduction_factor=spec.search.reduction_factor,
                                  stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(metric=spec.search.metric, mode=spec.search.mode, scheduler=scheduler,
                           num_samples=spec.search.num_samples,
                           max_concurrent_trials=concurrent)


def _tune_run_config(folder: Path):
    from ray import tune

    from dinor1.console import is_verbose

    return tune.RunConfig(name="tune", storage_path=str(folder),
                          verbose=1 if is_verbose() else 0,
                          failure_config=tune.FailureConfig(max_failures=0))


def _collect(results, plan: SweepPlan) -> list[dict]:
    """One entry per trial; a trial stopped early gets its MLflow run ended as KILLED."""
    import mlflow

    from dinor1 import storage as store

    client = mlflow.MlflowClient(plan.tracking_uri)
    trials = []
    for result in results:
        config = result.config or {}
        variant, seed = config.get("variant"), config.get("seed")
        params = dict(config.get("params") or {})
        label = trial_label(variant, int(seed), params) if variant is not None else "?"
        metrics = dict(result.metrics or {})
        status = "complete" if metrics.get(COMPLETE) else (
            "failed" if result.error is not None else "stopped")
        run_file = store.join(plan.storage, "trials", f"{plan.sweep.name}-{label}",
                              "mlflow_run_id")
        run_id = store.read_text(run_file).strip() if store.exists(run_file) else None
        if status == "stopped" and run_id:
            epochs = metrics.get(EPOCHS_DONE)
            client.set_tag(run_id, STOPPED_TAG, f"{plan.sweep.search.scheduler} after "
                           f"{epochs:g} epochs" if epochs else plan.sweep.search.scheduler)
            client.set_terminated(run_id, status="KILLED")
        trials.append({"label": label, "variant": variant, "seed": seed, "params": params,
                       "status": status, "run_id": run_id,
                       "metrics": {k: v for k, v in metrics.items()
                                   if isinstance(v, (int, float)) and "/" in k}})
    return trials


def _finish_parent(plan: SweepPlan, trials: list[dict]) -> None:
    """The sweep's run: the best complete trial's metric and name; ended."""
    import mlflow

    client = mlflow.MlflowClient(plan.tracking_uri)
    search = plan.sweep.search
    done = [t for t in trials if t["status"] == "complete" and search.metric in t["metrics"]]
    if done:
        pick = max if search.mode == "max" else min
        best = pick(done, key=lambda t: t["metrics"][search.metric])
        client.log_metric(plan.parent_run_id, f"best/{search.metric}",
                          best["metrics"][search.metric])
        client.set_tag(plan.parent_run_id, "dinor1.sweep_best", best["label"])
    client.log_metric(plan.parent_run_id, "sweep/trials_complete",
                      float(sum(t["status"] == "complete" for t in trials)))
    client.set_terminated(plan.parent_run_id,
                          status="FINISHED" if all(t["status"] != "failed" for t in trials)
                          else "FAILED")
