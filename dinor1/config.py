"""The typed configuration schema and its loader (YAML file + dotted ``key=value`` overrides).

Every section is a strict pydantic model: unknown keys and bad values are errors that name the
dotted key (``data.batch_size: Input should be greater than 0``), raised before anything starts.
Sections are added as the system grows; YAML files in ``jobs/`` are instances of the schema.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dinor1.errors import UserError
from dinor1.objectives.settings import (
    GRQOSettings,
    LossSettings,
    ObjectiveSettings,
    from_section,
)

# ImageNet normalisation: the default of data.pixel_mean / data.pixel_std and of
# dinor1.data.collate (defined here so that config does not import the data package).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Shards -> batches. Sizes are pixels; ``batch_size`` is per training worker."""

    train_shards: str | list[str] | None = None
    val_shards: str | list[str] | None = None
    batch_size: int = Field(4, gt=0)
    train_short_sides: list[int] = Field(
        default_factory=lambda: list(range(480, 801, 32)), min_length=1
    )
    train_max_size: int = Field(1333, gt=0)
    eval_short_side: int = Field(800, gt=0)
    eval_max_size: int = Field(1333, gt=0)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = Field(1, gt=0)
    keep_crowd: bool = False
    seed: int = 0
    shuffle_files: bool = True
    # train batches reach each worker in the same order on every run with the same seed (Ray
    # Data's preserve_order): what makes a restart from a checkpoint replay exactly the batches
    # an uninterrupted run would have seen. Off by default: ordered streaming can stall on a
    # slow block.
    preserve_order: bool = False
    local_shuffle_buffer: int = Field(256, ge=0)
    # decoded blocks Ray's iterator fetches ahead (iter_batches' prefetch_batches). Each epoch it
    # waits for that many before it yields the first; with 0 it yields each block once it
    # exists and still resolves one block ahead in its thread (the epoch lookahead below
    # collates ahead of the loop): 0 vs 2 cut an epoch's first batch ~0.3 -> 0.15 s at the
    # same samples/s (the bench's Ray epochs, 2 CPUs, 384 px)
    prefetch_batches: int = Field(0, ge=0)
    # training batches pulled ahead by a thread of the loop's own, across epoch ends: the next
    # epoch's Ray Data execution (~0.45 s to its first batch on a 2-core machine) starts while
    # these train (dinor1.data.epochs); 0 = iterate Ray's iterator directly
    epoch_lookahead_batches: int = Field(4, ge=0)
    # decode in the read tasks (one per shard: no second operator, a shard's first decoded
    # block out after a few dozen samples) or in a map stage of its own (tasks of a block of
    # read rows each: more parallel than the shards when a few large shards meet many CPUs);
    # "auto" = in the read tasks when the shards are at least as many as the cluster's CPUs
    decode_in_read: bool | Literal["auto"] = "auto"
    decode_concurrency: int | None = Field(None, gt=0)
    decode_num_cpus: float = Field(1.0, gt=0)
    decode_batch_size: int = Field(32, gt=0)
    # Ray Data's block size for decoded samples: small blocks reach the trainer sooner (the
    # first batch of an epoch waits for a whole block); Ray's default is 128 MiB
    block_megabytes: float = Field(16.0, gt=0)
    # where pixels become normalised floats: "device" sends uint8 batches (4x smaller) and
    # normalises on the training device; "collate" does it in the data iterator's threads;
    # "auto" = device on a GPU, collate on a CPU (bench data measures both)
    normalize_on: Literal["auto", "collate", "device"] = "auto"

    @model_validator(mode="after")
    def _positive_sides(self) -> DataConfig:
        if any(s <= 0 for s in self.train_short_sides):
            raise ValueError("train_short_sides must all be > 0")
        return self


class ModelConfig(StrictModel):
    """Where the weights start: a preset (random init), a dinor1 directory, or a Hugging Face
    Grounding DINO checkpoint (local directory or hub name)."""

    init: str = "tiny-cpu"
    prompt_encoder_ffn_dim: int | None = Field(None, gt=0)  # default: the preset's FFN size
    num_dn_queries: int = Field(100, ge=0)
    # the text encoder (BERT: 109 M of swin-t's 174 M parameters) gets no gradient in
    # visual-prompt training (the contrastive term uses its output detached): frozen, it holds
    # no gradients, no optimiser state and no ZeRO traffic
    freeze_text_encoder: bool = True
    # torch.compile of the backbone, enhancer/decoder layers and prompt encoder (model/compile.py)
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = None
    channels_last: bool = False  # NHWC conv weights and pixels (measure: bench model --compare)


class PromptsConfig(StrictModel):
    exemplars_per_class: int = Field(ObjectiveSettings.exemplars_per_class, gt=0)


class ObjectivesConfig(StrictModel):
    """The training objective's weights and switches. Their defaults are written once, in
    :class:`~dinor1.objectives.settings.LossSettings` (importable without pydantic)."""

    # the detection loss of every prediction set: focal, L1 and 1 - GIoU terms
    class_weight: float = Field(LossSettings.class_weight, ge=0)
    bbox_weight: float = Field(LossSettings.bbox_weight, ge=0)
    giou_weight: float = Field(LossSettings.giou_weight, ge=0)
    # the Hungarian matching cost (GRQO's reward is its negative): focal, L1 and -GIoU terms
    match_class_weight: float = Field(LossSettings.match_class_weight, ge=0)
    match_bbox_weight: float = Field(LossSettings.match_bbox_weight, ge=0)
    match_giou_weight: float = Field(LossSettings.match_giou_weight, ge=0)
    # focal loss and focal matching cost: the positives' weight (1 - it for the negatives) and
    # the focusing exponent
    focal_alpha: float = Field(LossSettings.focal_alpha, ge=0, le=1)
    focal_gamma: float = Field(LossSettings.focal_gamma, ge=0)
    denoising: bool = LossSettings.denoising  # the CDN queries' loss
    encoder_loss: bool = LossSettings.encoder_loss  # the encoder proposals' detection loss
    # the visual-text contrastive loss (class names from the train shards' manifest through the
    # frozen text encoder): "auto" = on when model.init is a pretrained checkpoint (its text
    # encoder means something) and the shards name their classes; true also for a preset
    contrastive: bool | Literal["auto"] = "auto"
    contrastive_weight: float = Field(LossSettings.contrastive_weight, ge=0)  # the release's


class GRQOConfig(StrictModel):
    """GRQO's form, weights and query mute (stage ``grqo``). Their defaults are written once,
    in :class:`~dinor1.objectives.settings.GRQOSettings`."""

    form: Literal["release", "policy_gradient"] = GRQOSettings.form
    alpha: float = Field(GRQOSettings.alpha, ge=0)  # the advantage term's weight (both forms)
    # policy_gradient form: the log-probability is log sigmoid of the query's best prompt logit
    # at each decoder layer ("decoder") or of its encoder objectness ("objectness": what the KL
    # term keeps near the reference)
    pg_score: Literal["decoder", "objectness"] = GRQOSettings.pg_score
    beta: float = Field(GRQOSettings.beta, ge=0)  # the KL term's weight
    # the last queries of each image's group (in top-K order) get advantage 0: a fraction of the
    # model's queries (the release mutes 300 of 900), or an absolute count that replaces it
    mute_fraction: float = Field(GRQOSettings.mute_fraction, ge=0, lt=1)
    num_mute: int | None = Field(GRQOSettings.num_mute, ge=0)
    ref_refresh: str = Field("epoch", pattern=r"^(epoch|never|steps:[1-9][0-9]*)$")

    def muted_queries(self, num_queries: int) -> int:
        """How many of ``num_queries`` queries per group are muted."""
        return from_section(GRQOSettings, self).muted_queries(num_queries)

    def check_advantage(self, num_queries: int) -> None:
        """Refuse (ValueError naming the key) a setting whose advantage term is identically 0,
        which would silently train the KL term alone."""
        muted = self.muted_queries(num_queries)
        key = "grqo.num_mute" if self.num_mute is not None else "grqo.mute_fraction"
        if muted >= num_queries:
            raise ValueError(f"{key} mutes {muted} of the model's {num_queries} queries: every "
                             f"advantage would be 0 (GRQO would train the KL term only); mute "
                             f"fewer (e.g. grqo.mute_fraction=0.333, the release's 300 of 900)")
        if self.alpha == 0:
            raise ValueError("grqo.alpha=0 turns the advantage term off (GRQO would train the "
                             "KL term only); use stages.grqo_epochs=0 for SFT")
        if self.form == "release" and muted == 0:
            raise ValueError(f"{key} mutes no query: in the release form the z-scored "
                             f"advantages of a group then sum to 0, and so does their gradient; "
                             f"mute some (the release mutes 300 of 900)")


class StagesConfig(StrictModel):
    """The paper's "1+5": ``sft_epochs`` of SFT then ``grqo_epochs`` with GRQO."""

    sft_epochs: int = Field(1, ge=0)
    grqo_epochs: int = Field(5, ge=0)
    max_steps_per_epoch: int | None = Field(None, gt=0)  # cap an epoch (smoke runs, demos)

    @model_validator(mode="after")
    def _some_epochs(self) -> StagesConfig:
        if self.sft_epochs + self.grqo_epochs == 0:
            raise ValueError("sft_epochs + grqo_epochs must be > 0")
        return self


class OptimizerConfig(StrictModel):
    lr: float = Field(4e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    backbone_lr_mult: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(StrictModel):
    """Linear warm-up from ``warmup_factor`` x lr, then x``gamma`` at each ``decay_epochs``."""

    warmup_steps: int = Field(1000, ge=0)
    warmup_factor: float = Field(0.1, gt=0, le=1)
    decay_epochs: list[int] = Field(default_factory=lambda: [8, 11])
    gamma: float = Field(0.1, gt=0)


class ScalingSection(StrictModel):
    num_workers: int = Field(2, gt=0)
    min_workers: int | None = Field(None, gt=0)  # with max_workers: an elastic range
    max_workers: int | None = Field(None, gt=0)
    # elastic range: how often Ray Train checks whether more workers fit now (then a restart
    # from the newest checkpoint at the larger size)
    resize_check_seconds: float = Field(60.0, gt=0)
    # how long a starting worker group waits for its resources before Ray Train gives up and
    # decides again (an elastic range: at the size that fits then); none: Ray's own (60 s, or
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
    start_timeout_seconds: float | None = Field(None, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # 0 = 1 with use_gpu; other values refused
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # custom Ray resources each worker also asks for, e.g. {trainer: 1}: only nodes offering
    # them run workers, and on an autoscaling cluster they say which node type to launch
    resources_per_worker: dict[str, float] = Field(default_factory=dict)

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name!r}: set it with cpus_per_worker / use_gpu (custom "
                                 "resources only here)")
            if amount <= 0:
                raise ValueError(f"{name!r}: must be > 0, got {amount}")
        return value


class DeepSpeedSection(StrictModel):
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_clipping: float = Field(0.1, ge=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    # ZeRO gradient-reduce / all-gather bucket size in elements (ZeRO-3: its reduce bucket);
    # None keeps DeepSpeed's default (5e8: a 1.9 GiB fp32 buffer per worker under ZeRO-1/2)
    bucket_elements: int | None = Field(None, gt=0)
    overlap_comm: bool = False  # overlap gradient reduction with the backward (GPU)
    # precision=bf16: reduce the gradients of Linear/Conv weights across workers in bf16
    # (DeepSpeed's torch_autocast default: half the gradient traffic, 8 mantissa bits per
    # worker's contribution); False (ours) reduces every gradient in fp32
    bf16_gradient_reduce: bool = False


class CheckpointSection(StrictModel):
    every_steps: int = Field(500, gt=0)
    num_to_keep: int = Field(2, gt=0)
    storage_path: str = "~/dinor1_runs"
    name: str | None = None  # Ray run name (default: the MLflow run name)
    max_failures: int = Field(0, ge=-1)
    # start a NEW run from another run's checkpoint (weights, optimiser, step, epoch): a
    # checkpoint folder, or a run folder (its newest checkpoint). Used to branch recipes.
    start_from: str | None = None
    # re-entering an existing run folder (same name and storage_path): true continues it even
    # with other settings than it was started with, or after it finished (the changes are
    # recorded in MLflow); false refuses both, and only resumes an interrupted run as it was
    resume: bool = False


class FaultsSection(StrictModel):
    """What a run does about bad steps (and hooks to rehearse it)."""

    # a step whose loss is NaN/inf on any worker is skipped on all of them (no backward, no
    # optimiser step), as is one whose gradients are (no optimiser step); both are counted and
    # logged, and this many in a row stop the run
    max_consecutive_nonfinite: int = Field(5, gt=0)
    # fault injection for tests and drills: these batches (1-based, counted from the start of
    # each attempt) get a NaN loss on rank 0
    inject_nonfinite_batches: list[int] = Field(default_factory=list)
    # ... and these get a finite loss but NaN gradients on rank 0 (caught after the backward)
    inject_nonfinite_grad_batches: list[int] = Field(default_factory=list)
    # ... and these get NaN prompt logits inside the forward on rank 0 (before the matching)
    inject_nonfinite_logits_batches: list[int] = Field(default_factory=list)
    # a drill: every optimiser step takes at least this long (the loop waits out the rest), so
    # that a tiny model's run lasts long enough to rehearse a lost node or a resize
    min_step_seconds: float = Field(0.0, ge=0)


class MLflowSection(StrictModel):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in storage_path
    experiment: str = "dinor1"
    run_name: str | None = None
    log_every_steps: int = Field(10, gt=0)
    # if the tracking server is unreachable when training ends, wait this long for it before
    # reporting what was not delivered (kept in a spool file for `dinor1 mlflow sync`)
    final_sync_seconds: float = Field(60.0, ge=0)
    # the final model as an MLflow model in the run (dinor1/registry.py), and with a name a new
    # version of that registered model (eval metrics on it), with this alias set on it
    log_model: bool = True
    register_model: str | None = None
    register_alias: str | None = None


class EvalSection(StrictModel):
    """``dinor1 eval`` and evaluation during training (``every_epochs``)."""

    checkpoint: str | None = None  # dinor1 dir, run folder, HF checkpoint / hub name, or preset
    shards: str | list[str] | None = None  # default: data.val_shards
    support_shards: str | list[str] | None = None  # generic prompts from here (default: train)
    prompt_modes: list[Literal["generic", "text", "interactive"]] = Field(
        default_factory=lambda: ["generic"], min_length=1)
    prompts_per_class: int = Field(16, gt=0)
    generic_prompts: str | None = None  # a saved prompts .safetensors instead of building them
    batch_size: int = Field(8, gt=0)
    top_k: int = Field(300, gt=0)
    prompt_chunk_size: int = Field(80, gt=0)  # classes per forward pass (LVIS: 1203 in chunks)
    # auto: lvis for LVIS shards, else coco; odinw: eval.shards is a converted ODinW tree
    scorer: Literal["auto", "coco", "lvis", "odinw"] = "auto"
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    num_actors: int = Field(1, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    max_images: int | None = Field(None, gt=0)
    grid_images: int = Field(8, ge=0)
    out_dir: str | None = None  # default: <storage>/<name>/eval
    every_epochs: int = Field(0, ge=0)  # during training: evaluate every N epochs (0 = never)


class TrainConfig(StrictModel):
    """The whole job: ``dinor1 train CONFIG.yaml key=value ...``."""

    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    objectives: ObjectivesConfig = Field(default_factory=ObjectivesConfig)
    grqo: GRQOConfig = Field(default_factory=GRQOConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpointing: CheckpointSection = Field(default_factory=CheckpointSection)
    faults: FaultsSection = Field(default_factory=FaultsSection)
    mlflow: MLflowSection = Field(default_factory=MLflowSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.eval.every_epochs and self.data.val_shards is None and self.eval.shards is None:
            raise ValueError("eval.every_epochs needs data.val_shards (or eval.shards)")
        if (self.scaling.min_workers is None) != (self.scaling.max_workers is None):
            raise ValueError("scaling.min_workers and scaling.max_workers go together")
        if self.scaling.gpus_per_worker and not self.scaling.use_gpu:
            raise ValueError("scaling.gpus_per_worker needs scaling.use_gpu=true")
        if self.scaling.gpus_per_worker not in (0, 1):
            # a worker is one process on one device: its DeepSpeed engine and its batches use
            # ray.train.torch.get_device(); NCCL refuses two ranks on one GPU (a fraction), and
            # a second GPU per worker would sit idle
            raise ValueError(f"scaling.gpus_per_worker must be 1 (one GPU per worker), got "
                             f"{self.scaling.gpus_per_worker:g}; for more GPUs raise "
                             f"scaling.num_workers")
        if self.model.compile and self.deepspeed.zero_stage == 3:
            # ZeRO-3 gathers and releases partitioned weights in module hooks, which would run
            # inside the compiled submodules' graphs; only stages 0-2 are supported (and tested)
            raise ValueError("model.compile needs deepspeed.zero_stage 0, 1 or 2 (ZeRO-3's "
                             "weight-gathering hooks inside compiled submodules are not "
                             "supported)")
        queries = known_num_queries(self.model.init)
        if self.stages.grqo_epochs and queries is not None:
            self.grqo.check_advantage(queries)
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision fp16 needs scaling.use_gpu (use bf16 or fp32)")
        return self


def known_num_queries(init: str) -> int | None:
    """The query count of ``model.init`` when it can be known before the model is built (a
    preset, or a local directory with a config.json); None otherwise (checked in the worker)."""
    from dinor1.model.presets import PRESETS, preset_config

    if init in PRESETS:
        return preset_config(init).num_queries
    config = Path(init) / "config.json"
    if config.is_file():
        import json

        payload = json.loads(config.read_text())
        return payload.get("grounding_dino", payload).get("num_queries")
    return None


M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML: ``2``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def validate(model: type[M], data: dict[str, Any], prefix: str = "") -> M:
    """Build ``model`` from ``data``; on failure, a UserError naming the first bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = "unknown key" if err["type"] == "extra_forbidden" else \
            err["msg"].removeprefix("Value error, ")
        if not key:  # a whole-config check; its message names the keys
            raise UserError(f"config: {msg.removeprefix('Value error, ')}") from None
        raise UserError(f"config key {key!r}: {msg}") from None


def load_train_config(path: str | Path | None, overrides: list[str] = (), *,
                      require_train_shards: bool = True) -> TrainConfig:
    """YAML file (optional) + overrides -> a validated :class:`TrainConfig`.

    A job YAML's ``runtime_env:`` section (what ``dinor1 submit`` sends as the job's Ray
    runtime environment) and Ray runtime-environment keys at its top level (``working_dir``,
    ``env_vars``, ..., so one file also serves ``ray job submit --runtime-env``) are not part
    of the training config and are dropped here.
    """
    data = load_yaml(path) if path else {}
    for key in ("runtime_env", *RUNTIME_ENV_KEYS):
        data.pop(key, None)
    cfg = validate(TrainConfig, apply_overrides(data, list(overrides)))
    if require_train_shards and cfg.data.train_shards is None:
        raise UserError("config: data.train_shards is required")
    return cfg


def run_name(cfg: TrainConfig) -> str:
    """The run's name: its folder in the storage path and its Ray run name."""
    return cfg.checkpointing.name or cfg.mlflow.run_name or "dinor1"


def resolve_paths(cfg: TrainConfig) -> tuple[Path | str, str, str]:
    """(storage folder or object-store URI, run name, MLflow tracking URI) of a job.

    The tracking URI is ``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
    in the storage folder (which an object-store storage path cannot hold: then one of the
    first two is required).
    """
    from dinor1.storage import is_uri

    location = cfg.checkpointing.storage_path
    name = run_name(cfg)
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if is_uri(location):
        if not uri:
            raise UserError(f"checkpointing.storage_path {location} is an object-store URI: set "
                            "mlflow.tracking_uri (or MLFLOW_TRACKING_URI) too, e.g. an MLflow "
                            "server (a sqlite file cannot live in an object store)")
        return location.rstrip("/"), name, uri
    storage = Path(os.path.expanduser(location.removeprefix("file://"))).resolve()
    return storage, name, uri or f"sqlite:///{storage / 'mlflow.db'}"


def local_output_dir(storage: Path | str, name: str, leaf: str) -> Path:
    """``storage/name/leaf`` for a local storage folder; ``~/dinor1_runs/name/leaf`` when the
    storage is an object store (reports are written locally and logged to MLflow)."""
    if isinstance(storage, Path):
        return storage / name / leaf
    return Path("~/dinor1_runs").expanduser() / name / leaf


RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "env_vars", "pip", "uv", "conda", "excludes",
                    "container", "image_uri", "py_executable", "config", "nsight")


def experiment_id(client, name: str, uri: str, storage: Path | str) -> str:
    """The MLflow experiment ``name`` (created if missing; with a sqlite store its artifacts go
    to ``storage/mlartifacts``, or beside the database when the storage is an object store,
    rather than the working directory)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite"):
        folder = storage if isinstance(storage, Path) else Path(uri.split(":///", 1)[1]).parent
        artifacts = (folder / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)
