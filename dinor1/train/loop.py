"""The per-worker training function run by Ray Train's ``TorchTrainer`` (one per worker).

Stages: ``sft`` epochs then ``grqo`` epochs ("1+5"). Every step is deterministic given
(seed, rank, step): the prompt and CDN generators (host and device, ``model/randomness.py``)
and torch's global RNG are re-seeded from them, so a resumed run needs no saved RNG state.
Checkpoints are DeepSpeed checkpoint folders (every rank writes its shard) plus the reference
model, reported with ``ray.train.report`` and restored from ``ray.train.get_checkpoint()``.
Rank 0 logs to MLflow into the run the driver created.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from dinor1.train.checkpoints import CHECKPOINT_TAG, REFERENCE_NAME, STATE_NAME


def _objective_settings(cfg, num_queries: int):
    from dinor1.objectives.step import ObjectiveSettings

    o, g = cfg.objectives, cfg.grqo
    if cfg.stages.grqo_epochs:  # (a checkpoint's query count is known only now)
        g.check_advantage(num_queries)
    return ObjectiveSettings(
        class_weight=o.class_weight, bbox_weight=o.bbox_weight, giou_weight=o.giou_weight,
        denoising=o.denoising, encoder_loss=o.encoder_loss,
        exemplars_per_class=cfg.prompts.exemplars_per_class, grqo_form=g.form,
        grqo_alpha=g.alpha, grqo_beta=g.beta,
        grqo_pg_score=g.pg_score, grqo_num_mute=g.muted_queries(num_queries),
        contrastive_weight=o.contrastive_weight)


def _report_metrics(metrics: dict) -> dict:  # what goes with a checkpoint to Ray Train
    return {k: v for k, v in metrics.items() if k.startswith(("loss/total", "train/"))}


def _build_model(cfg):
    from dinor1.model.dino_r1 import DinoR1, DinoR1Settings
    from dinor1.model.presets import PRESETS, preset_config

    settings = DinoR1Settings(num_dn_queries=cfg.model.num_dn_queries)
    ffn = cfg.model.prompt_encoder_ffn_dim
    if ffn is None and cfg.model.init in PRESETS:
        ffn = preset_config(cfg.model.init).encoder_ffn_dim
    if ffn is not None:
        settings.prompt_encoder_ffn_dim = ffn
    model = DinoR1.from_pretrained(cfg.model.init, settings)
    if cfg.model.freeze_text_encoder:
        model.gdino.model.text_backbone.requires_grad_(False)
    if cfg.model.channels_last:
        from dinor1.model.compile import use_channels_last

        use_channels_last(model)
    if cfg.model.compile:
        from dinor1.model.compile import compile_hot_modules

        compile_hot_modules(model, backend=cfg.model.compile_backend,
                            mode=cfg.model.compile_mode)
    return model


def _class_text(cfg, model, class_names: dict[str, str] | None):
    """{category id: frozen text embedding of its name} for the contrastive loss, or None (see
    ``launch.contrastive_class_names``). Computed once, before the engine partitions weights."""
    if not class_names:
        return None
    from dinor1.model.text import class_text_embeddings, load_tokenizer

    names = {int(k): v for k, v in class_names.items()}
    tokenizer = load_tokenizer(cfg.model.init, model.config.text_config.vocab_size,
                               list(names.values()))
    was_training = model.training
    embeddings = class_text_embeddings(model.eval(), tokenizer, names)
    model.train(was_training)
    return embeddings


def _engine_device_args(cfg):
    """DeepSpeed's ``args`` naming the worker's own GPU (``device_rank``), or None on CPU.

    Left alone, DeepSpeed puts its engine on ``cuda:LOCAL_RANK`` while Ray Train moves the
    batches to ``ray.train.torch.get_device()``; the two agree only as long as Ray's device order
    matches the local ranks. Naming the device makes them one by construction."""
    if not (cfg.scaling.use_gpu and torch.cuda.is_available()):
        return None
    import argparse

    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return argparse.Namespace(device_rank=device.index)


def tensor_checksum(obj) -> float:
    """float64 sum of every floating-point tensor inside nested dicts/lists (e.g. an optimiser
    state dict), for checking that a restore brought back what was saved."""
    if isinstance(obj, torch.Tensor):
        return float(obj.detach().double().sum()) if obj.is_floating_point() else 0.0
    if isinstance(obj, dict):
        return sum(tensor_checksum(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_checksum(v) for v in obj)
    return 0.0


def weight_checksum(state_dict: dict[str, torch.Tensor]) -> float:
    """Sum of every floating-point weight in float64: equal weights give equal checksums."""
    return tensor_checksum(state_dict)


def state_checksums(engine, reference) -> dict[str, float]:
    """Weights (gathered: collective under ZeRO-3), this rank's optimiser state, reference."""
    from dinor1.objectives.reference import full_state_dict

    sums = {"weights": weight_checksum(full_state_dict(engine)),
            "optimizer": tensor_checksum(engine.optimizer.state_dict())}
    if reference is not None:
        sums["reference"] = weight_checksum(reference.model.state_dict())
    return sums


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts/lists (e.g. an optimiser state dict)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def memory_use(engine) -> dict[str, float]:
    """This worker's peak memory (process RSS; CUDA allocator peak on a GPU), the optimiser
    state it holds (its ZeRO partition: shrinks ~1/N with ZeRO-1/2/3) and its torch threads."""
    import resource

    state = engine.optimizer.state_dict()
    # the AdamW moments (ZeRO-1/2: "base_optimizer_state", ZeRO-3: "optimizer_state_dict");
    # the rest of a ZeRO state is its fp32 master partition
    moments = state.get("base_optimizer_state", state.get("optimizer_state_dict", state))
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "optimizer_state_mb": tensor_bytes(state) / 2**20,
           "adam_moments_mb": tensor_bytes(moments) / 2**20,
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradients
    (``faults.max_consecutive_nonfinite``)."""


class _PoisonGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients (fault drills)."""

    @staticmethod
    def forward(ctx, loss):
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@contextlib.contextmanager
def _nan_logits(model):
    """Every prompt logit of the forward NaN (fault drills: a non-finite FORWARD, which the
    Hungarian matching sees before any loss exists)."""
    handle = model.prompt_classifier.register_forward_hook(
        lambda module, args, output: output * float("nan"))
    try:
        yield
    finally:
        handle.remove()


def _gradients_finite(engine, zero_stage: int) -> bool:
    """Before ``engine.step()``: whether this step's gradients are finite. ZeRO-1/2/3 check this
    themselves (across ranks) and skip the step, so only ZeRO-0 is checked here, on the already
    all-reduced (hence identical on every rank) gradients. A bad ZeRO-0 step has its gradients
    dropped (the caller then skips ``engine.step()``), so every weight stays as it was."""
    if zero_stage > 0:
        return True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all()):
        return True
    for p in engine.module.parameters():
        p.grad = None
    return False


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on EVERY worker (one all-reduce), so all skip alike."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0],
                       device=loss.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def _any_empty(batch) -> bool:
    """Whether any worker's batch has no usable image (one all-reduce). The forward holds
    collectives (the box-count average; ZeRO-3's parameter gathers), so a worker may skip it
    only when every worker does."""
    empty = torch.tensor([float(len(batch["image_ids"]) == 0)],
                         device=batch["pixel_values"].device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(empty, op=torch.distributed.ReduceOp.MAX)
    return empty.item() > 0


def _broadcast(value, rank: int):
    """Rank 0's ``value`` on every rank."""
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _restore_point(config: dict, rank: int):
    """The checkpoint this attempt starts from (the same on every rank), or None.

    This run's own newest checkpoint first: the newer of the one Ray Train registered (after a
    restart) and the newest complete one in the run folder (a worker lost between the save and
    Ray's registration of it must not cost those steps); else ``start_from`` (branching off
    another run). Rank 0 decides.
    """
    import ray.train

    from dinor1.train.checkpoints import checkpoint_step, newest_complete

    registered = ray.train.get_checkpoint()
    choice = None
    if rank == 0:
        folder, step, _ = newest_complete(config["run_folder"]) if config.get("run_folder") \
            else ("", -1, [])
        ray_step = checkpoint_step(Path(registered.path).name) if registered else None
        if registered is not None and (ray_step is None or ray_step >= step):
            choice = ("registered", None)
        elif folder:
            choice = ("folder", folder)
        elif config.get("start_from"):
            choice = ("folder", config["start_from"])
    choice = _broadcast(choice, rank)
    if choice is None:
        return None
    if choice[0] == "registered":
        return registered
    return ray.train.Checkpoint(choice[1])  # a folder or a URI


def _evaluate(cfg, engine, config: dict, tracker, step: int, epoch: int) -> None:
    """Generic-prompt AP on the val split (every rank takes part; rank 0 logs)."""
    import ray.train

    from dinor1.data.pipeline import iter_detection_batches
    from dinor1.eval.during_training import evaluate_during_training
    from dinor1.objectives.reference import unwrap

    started = time.perf_counter()
    data = cfg.data.model_copy(update={"batch_size": cfg.eval.batch_size})
    skipped: list[str] = []
    metrics = evaluate_during_training(
        unwrap(engine),
        iter_detection_batches(ray.train.get_dataset_shard("val"), data, train=False),
        iter_detection_batches(ray.train.get_dataset_shard("support"), data, train=False),
        config["eval_categories"], per_class=cfg.eval.prompts_per_class, top_k=cfg.eval.top_k,
        chunk_size=cfg.eval.prompt_chunk_size, skipped_errors=skipped)
    if metrics:
        if skipped:
            tracker.log_text("".join(f"{e}\n" for e in skipped), "eval/skipped_samples.txt")
        metrics["eval/seconds"] = time.perf_counter() - started
        tracker.log_now(metrics, step)
        print(f"[eval] epoch {epoch} step {step}: AP {metrics['eval/generic/AP']:.3f} "
              f"AP50 {metrics['eval/generic/AP50']:.3f}", flush=True)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    from dinor1.config import TrainConfig
    from dinor1.data.epochs import EpochBatches
    from dinor1.data.pipeline import iter_detection_batches
    from dinor1.data.quality import QualityCounter
    from dinor1.model.dino_r1 import load_weights, save_weights
    from dinor1.model.randomness import step_generators, step_seed
    from dinor1.objectives.reference import ReferenceModel, full_state_dict, unwrap
    from dinor1.objectives.step import TrainingObjective
    from dinor1.storage import join
    from dinor1.train.checkpoints import checkpoint_dir_name, mark_complete
    from dinor1.train.optim import deepspeed_config, lr_factor, parameter_groups, set_lr
    from dinor1.train.safe_load import use_weights_only_loading
    from dinor1.train.tracking import RankZeroTracker, gather_placements

    # transformers' deformable attention checks its spatial shapes against the sequence length
    # on every call, a device-to-host sync each (~20 per step); dinor1 builds both from the same
    # features, so the check cannot fail here (set it to 0 to have it back)
    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a slow JIT build
    model = _build_model(cfg)
    wrapped = TrainingObjective(model, _class_text(cfg, model, config.get("class_names")))
    groups = parameter_groups(model, cfg)
    if wrapped.contrastive is not None:  # its learnable temperature
        groups.append({"params": list(wrapped.contrastive.parameters()), "lr": cfg.optimizer.lr,
                       "weight_decay": 0.0, "name": "contrastive"})
    optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas)
    engine, optimizer, _, _ = deepspeed.initialize(args=_engine_device_args(cfg),
                                                   model=wrapped, optimizer=optimizer,
                                                   config=deepspeed_config(cfg))
    if wrapped.class_text is not None:  # (a plain dict: the engine did not move it)
        wrapped.class_text = {k: v.to(engine.device) for k, v in wrapped.class_text.items()}
    use_weights_only_loading(engine)  # resuming never unpickles code
    if cfg.deepspeed.zero_stage == 3:
        wrapped.register_for_zero3()
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stages = ["sft"] * cfg.stages.sft_epochs + ["grqo"] * cfg.stages.grqo_epochs
    state = {"step": 0, "epoch": 0}
    reference = None
    checkpoint = _restore_point(config, rank)
    attempt = _broadcast(uuid.uuid4().hex[:8], rank)  # names this attempt's checkpoints
    saved_in_attempt: list[int] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
            state = json.loads((Path(folder) / STATE_NAME).read_text())
            if (Path(folder) / REFERENCE_NAME).exists():
                reference = ReferenceModel(engine, cfg.grqo.ref_refresh)
                load_weights(reference.model, Path(folder) / REFERENCE_NAME)
                reference.last_refresh_step = state.get("reference_refresh_step", 0)
    quality = QualityCounter()  # skipped samples and dropped boxes, by kind
    if rank == 0:  # saved totals are the sums over all ranks: restore them on one rank only
        quality.load_state_dict(state.get("data_quality", {}))
    tracker = RankZeroTracker(config, rank, world)
    tracker.set_tag("dinor1.workers", json.dumps(gather_placements(rank)))
    steps_done = 0  # by this worker in this attempt (a restart starts again at 0)
    if checkpoint is not None:  # lets a user (and the tests) check what was restored
        sums = state_checksums(engine, reference)
        tracker.log_now({"resume/step": float(state["step"]),
                         **{f"resume/{k}_checksum": v for k, v in sums.items()}}, state["step"])
    objective = _objective_settings(cfg, model.config.num_queries)
    shard = ray.train.get_dataset_shard("train")

    def save(metrics: dict) -> None:
        # (the end of training right after a periodic save is a second save at that step)
        name = checkpoint_dir_name(state["step"],
                                   f"{attempt}_{saved_in_attempt.count(state['step'])}")
        state["data_quality"] = quality.totals().state_dict()  # collective: every rank
        with tempfile.TemporaryDirectory() as folder:
            engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
            if rank == 0:
                payload = dict(state, mlflow_run_id=config.get("mlflow_run_id"),
                               world_size=world, zero_stage=cfg.deepspeed.zero_stage)
                if reference is not None:
                    save_weights(reference.model, Path(folder) / REFERENCE_NAME)
                    payload["reference_refresh_step"] = reference.last_refresh_step
                (Path(folder) / STATE_NAME).write_text(json.dumps(payload))
            state["saved_step"] = state["step"]
            saved_in_attempt.append(state["step"])
            sums = state_checksums(engine, reference)
            tracker.log_now({f"checkpoint/{k}_checksum": v for k, v in sums.items()},
                            state["step"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)
        # every rank's files are uploaded once all reports returned: only now is it complete
        torch.distributed.barrier()
        if rank == 0 and config.get("run_folder"):
            mark_complete(join(config["run_folder"], name), state["step"], world)

    metrics: dict[str, float] = {}
    start_epoch = state["epoch"]
    state.setdefault("nonfinite_steps", 0)
    streak: list[int] = []  # batches of the current run of non-finite losses
    batches_seen = 0  # in this attempt (fault injection counts these)
    cap = cfg.stages.max_steps_per_epoch
    resume_skip = state.pop("steps_in_epoch", 0)
    # the next epoch's Ray Data execution starts while this one's last batches still train
    epoch_batches = EpochBatches(
        lambda e: iter_detection_batches(shard, cfg.data, train=True, epoch=e),
        [e for e in range(start_epoch, len(stages))  # (not one saved at its last step)
         if not (e == start_epoch and cap and resume_skip >= cap)],
        lookahead=cfg.data.epoch_lookahead_batches, limit=cap or None)

    def count_skipped(epoch: int, step: int, key: str, metric: str) -> None:
        epoch_batches.extend(epoch)  # this batch did not count toward the cap
        state[key] = state.get(key, 0) + 1
        tracker.log_now({metric: float(state[key])}, step + 1)

    try:
        for epoch in range(start_epoch, len(stages)):
            stage = stages[epoch]
            if stage == "grqo":
                if reference is None:
                    reference = ReferenceModel(engine, cfg.grqo.ref_refresh)
                    reference.last_refresh_step = state["step"]
                elif epoch != start_epoch and reference.should_refresh(state["step"],
                                                                       new_epoch=True):
                    reference.refresh(engine, state["step"])
            engine.train()
            # resuming mid-epoch: skip the batches of this epoch already trained on (approximate:
            # Ray's streaming split may hand a worker different blocks than last time)
            skip = resume_skip if epoch == start_epoch else 0
            steps_this_epoch = skip
            if cap and skip >= cap:  # saved at this epoch's last step: nothing left of it to train
                skip = 0
            done_already = cap and steps_this_epoch >= cap
            batches = iter(()) if done_already else epoch_batches.batches(epoch)
            wait_start = time.perf_counter()
            wait_total = compute_total = 0.0
            start_wait = None  # the epoch's first batch: Ray Data starting this epoch's execution
            for batch in batches:
                if skip:
                    skip -= 1
                    wait_start = time.perf_counter()
                    continue
                got_batch = time.perf_counter()
                step = state["step"]
                # host + device generators, seeded together (model/randomness.py)
                generators = step_generators(step_seed(cfg.seed, rank, step),
                                             batch["pixel_values"].device)
                torch.manual_seed(step_seed(cfg.seed, rank, step))
                if (reference is not None and stage == "grqo"
                        and reference.kind == "steps" and reference.should_refresh(step, False)):
                    reference.refresh(engine, step)
                set_lr(optimizer, base_lrs, lr_factor(step, epoch, cfg))
                quality.update(batch)
                if _any_empty(batch):  # a worker drew only corrupt samples: all skip this batch
                    count_skipped(epoch, step, "empty_batches", "train/empty_batches")
                    wait_start = time.perf_counter()
                    continue
                poison = (rank == 0  # rehearsed fault: NaN logits inside this forward
                          and batches_seen + 1 in cfg.faults.inject_nonfinite_logits_batches)
                with _nan_logits(unwrap(engine)) if poison else contextlib.nullcontext():
                    loss, logs = engine(batch, stage=stage, settings=objective,
                                        reference=reference if stage == "grqo" else None,
                                        generators=generators)
                batches_seen += 1
                if rank == 0:  # rehearsed faults (faults.inject_*)
                    if batches_seen in cfg.faults.inject_nonfinite_batches:
                        loss = loss * float("nan")
                    if batches_seen in cfg.faults.inject_nonfinite_grad_batches:
                        loss = _PoisonGradient.apply(loss)
                bad = None
                if not _all_finite(loss):  # on every rank: all of them skip this step together
                    bad = "loss"
                else:
                    engine.backward(loss)
                    # (between gradient-accumulation boundaries nothing is applied or checked: a
                    # non-finite gradient stays in the sum and is caught at the boundary)
                    boundary = engine.is_gradient_accumulation_boundary()
                    if boundary and not _gradients_finite(engine, cfg.deepspeed.zero_stage):
                        bad = "gradients"  # (ZeRO-0: dropped, no optimiser step)
                    else:
                        engine.step()  # ZeRO-1/2/3: DeepSpeed skips a step with non-finite grads
                        if boundary and not engine.was_step_applied():
                            bad = "gradients"
                if bad == "gradients" and cfg.deepspeed.precision == "fp16":
                    # fp16 loss scaling: an overflow skips the step and lowers the scale (routine)
                    count_skipped(epoch, step, "overflow_steps", "train/fp16_overflow_steps")
                    wait_start = time.perf_counter()
                    continue
                if bad:
                    epoch_batches.extend(epoch)  # this batch did not count toward the cap
                    state["nonfinite_steps"] += 1
                    key = "nonfinite_grad_steps" if bad == "gradients" else "nonfinite_loss_steps"
                    state[key] = state.get(key, 0) + 1
                    streak.append(batches_seen)
                    tracker.log_now({"train/nonfinite_steps": float(state["nonfinite_steps"]),
                                     f"train/{key}": float(state[key])}, step + 1)
                    if rank == 0:
                        print(f"[train] non-finite {bad} at step {step + 1}: step skipped "
                              f"({len(streak)} in a row, {state['nonfinite_steps']} in all)",
                              file=sys.stderr, flush=True)
                    if len(streak) >= cfg.faults.max_consecutive_nonfinite:
                        raise NonFiniteLossError(
                            f"{len(streak)} consecutive non-finite losses or gradients after step "
                            f"{step} (faults.max_consecutive_nonfinite="
                            f"{cfg.faults.max_consecutive_nonfinite}); the last good checkpoint is "
                            f"the newest one in the run folder (step {state.get('saved_step', 0)})")
                    wait_start = time.perf_counter()
                    continue
                streak.clear()
                state["step"] = step = step + 1
                steps_this_epoch += 1
                steps_done += 1
                done = time.perf_counter()
                wait_total += got_batch - wait_start
                compute_total += done - got_batch
                if start_wait is None:
                    start_wait = got_batch - wait_start
                metrics = {
                    **logs, "train/epoch": float(epoch), "train/stage_grqo": float(stage == "grqo"),
                    "train/lr": optimizer.param_groups[0]["lr"],  # the head group (backbone: x0.1)
                    "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "train/samples_per_s": len(batch["image_ids"]) * world / (done - wait_start),
                    "train/step_seconds": done - wait_start,
                    "train/compute_seconds": done - got_batch,
                    "train/data_wait_fraction": wait_total / max(wait_total + compute_total, 1e-9),
                    # the same without the epoch's first batch (a fixed cost per epoch, ~0.4 s here:
                    # Ray Data starts a new execution; it weighs little in long epochs)
                    "train/data_wait_fraction_steady": (wait_total - start_wait) / max(
                        wait_total - start_wait + compute_total, 1e-9),
                    "train/epoch_start_wait_seconds": start_wait,
                }
                if step % cfg.mlflow.log_every_steps == 0:  # the same steps on every rank
                    metrics.update(quality.metrics("data/"))  # collective: every rank
                if reference is not None and stage == "grqo":
                    metrics.update(reference.stats())
                tracker.log(metrics, step, epoch=epoch, stage=stage)
                if step % cfg.checkpointing.every_steps == 0:
                    state["steps_in_epoch"] = steps_this_epoch
                    save(_report_metrics(metrics))
                    state.pop("steps_in_epoch")
                wait_start = time.perf_counter()
                if cap and steps_this_epoch >= cap:
                    break
            if hasattr(batches, "close"):  # left at the cap: drop what is buffered of this epoch
                batches.close()
            state["epoch"] = epoch + 1
            if cfg.eval.every_epochs and state["epoch"] % cfg.eval.every_epochs == 0:
                _evaluate(cfg, engine, config, tracker, state["step"], epoch)
    finally:
        epoch_batches.close()
    save(_report_metrics(metrics))
    tracker.log_now(quality.metrics("data/"), state["step"])  # collective: every rank
    skipped = quality.gather_errors()  # collective: every rank
    if skipped:
        tracker.log_text("".join(f"{e}\n" for e in skipped), "data/skipped_samples.txt")
    tracker.set_tag("dinor1.workers", json.dumps(gather_placements(
        rank, steps=steps_done, **memory_use(engine))))
    weights = full_state_dict(engine)  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        tracker.finish(unwrap(engine), weights, state["step"])
    torch.distributed.barrier()
