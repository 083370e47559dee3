"""The per-worker training function run by Ray Train's ``TorchTrainer`` (one per worker).

Stages: ``sft`` epochs then ``grqo`` epochs ("1+5"). Every step is deterministic given
(seed, rank, step): the prompt/CDN generator and torch's global RNG are re-seeded from them, so a
resumed run needs no saved RNG state. Checkpoints are DeepSpeed checkpoint folders (every rank
writes its shard) plus the reference model, reported with ``ray.train.report`` and restored from
``ray.train.get_checkpoint()``. Rank 0 logs to MLflow into the run the driver created.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

CHECKPOINT_TAG = "ds"
STATE_NAME = "trainer_state.json"
REFERENCE_NAME = "reference.safetensors"


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1)


def _objective_settings(cfg):
    from dinor1.objectives.step import ObjectiveSettings

    o, g = cfg.objectives, cfg.grqo
    return ObjectiveSettings(
        class_weight=o.class_weight, bbox_weight=o.bbox_weight, giou_weight=o.giou_weight,
        denoising=o.denoising, encoder_loss=o.encoder_loss,
        exemplars_per_class=cfg.prompts.exemplars_per_class, grqo_form=g.form,
        grqo_alpha=g.alpha, grqo_beta=g.beta, grqo_num_mute=g.num_mute)


def _build_model(cfg):
    from dinor1.model.dino_r1 import DinoR1, DinoR1Settings
    from dinor1.model.presets import PRESETS, preset_config

    settings = DinoR1Settings(num_dn_queries=cfg.model.num_dn_queries)
    ffn = cfg.model.prompt_encoder_ffn_dim
    if ffn is None and cfg.model.init in PRESETS:
        ffn = preset_config(cfg.model.init).encoder_ffn_dim
    if ffn is not None:
        settings.prompt_encoder_ffn_dim = ffn
    return DinoR1.from_pretrained(cfg.model.init, settings)


def tensor_checksum(obj) -> float:
    """float64 sum of every floating-point tensor inside nested dicts/lists (e.g. an optimiser
    state dict), for checking that a restore brought back what was saved."""
    if isinstance(obj, torch.Tensor):
        return float(obj.double().sum()) if obj.is_floating_point() else 0.0
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


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss (``faults.max_consecutive_nonfinite``)."""


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on EVERY worker (one all-reduce), so all skip alike."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0],
                       device=loss.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def _empty_loss(engine) -> torch.Tensor:
    """A zero loss touching every parameter: keeps the workers' collectives in lock step when
    one of them drew a batch whose samples were all corrupt."""
    return sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0


def _evaluate(cfg, engine, config: dict, tracker, step: int, epoch: int) -> None:
    """Generic-prompt AP on the val split (every rank takes part; rank 0 logs)."""
    import ray.train

    from dinor1.data.pipeline import iter_detection_batches
    from dinor1.eval.during_training import evaluate_during_training
    from dinor1.objectives.reference import unwrap

    started = time.perf_counter()
    data = cfg.data.model_copy(update={"batch_size": cfg.eval.batch_size})
    metrics = evaluate_during_training(
        unwrap(engine),
        iter_detection_batches(ray.train.get_dataset_shard("val"), data, train=False),
        iter_detection_batches(ray.train.get_dataset_shard("support"), data, train=False),
        config["eval_categories"], per_class=cfg.eval.prompts_per_class, top_k=cfg.eval.top_k,
        chunk_size=cfg.eval.prompt_chunk_size)
    if metrics:
        metrics["eval/seconds"] = time.perf_counter() - started
        tracker.log_now(metrics, step)
        print(f"[eval] epoch {epoch} step {step}: AP {metrics['eval/generic/AP']:.3f} "
              f"AP50 {metrics['eval/generic/AP50']:.3f}", flush=True)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    from dinor1.config import TrainConfig
    from dinor1.data.pipeline import iter_detection_batches
    from dinor1.model.dino_r1 import load_weights, save_weights
    from dinor1.objectives.reference import ReferenceModel, full_state_dict, unwrap
    from dinor1.objectives.step import TrainingObjective
    from dinor1.train.optim import deepspeed_config, lr_factor, parameter_groups, set_lr
    from dinor1.train.safe_load import use_weights_only_loading
    from dinor1.train.tracking import RankZeroTracker, gather_placements

    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a slow JIT build
    model = _build_model(cfg)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.optimizer.lr,
                                  betas=cfg.optimizer.betas)
    wrapped = TrainingObjective(model)
    engine, optimizer, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer,
                                                   config=deepspeed_config(cfg))
    use_weights_only_loading(engine)  # resuming never unpickles code
    if cfg.deepspeed.zero_stage == 3:
        wrapped.register_for_zero3()
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stages = ["sft"] * cfg.stages.sft_epochs + ["grqo"] * cfg.stages.grqo_epochs
    state = {"step": 0, "epoch": 0, "skipped_samples": 0}
    reference = None
    checkpoint = ray.train.get_checkpoint()  # this run's own latest (after a restart) first
    if checkpoint is None and config.get("start_from"):  # a new run branching off another's
        checkpoint = ray.train.Checkpoint(config["start_from"])  # a folder or a URI
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
            state = json.loads((Path(folder) / STATE_NAME).read_text())
            if (Path(folder) / REFERENCE_NAME).exists():
                reference = ReferenceModel(engine, cfg.grqo.ref_refresh)
                load_weights(reference.model, Path(folder) / REFERENCE_NAME)
                reference.last_refresh_step = state.get("reference_refresh_step", 0)
    tracker = RankZeroTracker(config, rank, world)
    tracker.set_tag("dinor1.workers", json.dumps(gather_placements(rank)))
    steps_done = 0  # by this worker in this attempt (a restart starts again at 0)
    if checkpoint is not None:  # lets a user (and the tests) check what was restored
        sums = state_checksums(engine, reference)
        tracker.log_now({"resume/step": float(state["step"]),
                         **{f"resume/{k}_checksum": v for k, v in sums.items()}}, state["step"])
    objective = _objective_settings(cfg)
    shard = ray.train.get_dataset_shard("train")

    def save(metrics: dict) -> None:
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
            sums = state_checksums(engine, reference)
            tracker.log_now({f"checkpoint/{k}_checksum": v for k, v in sums.items()},
                            state["step"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    metrics: dict[str, float] = {}
    start_epoch = state["epoch"]
    state.setdefault("nonfinite_steps", 0)
    streak: list[int] = []  # batches of the current run of non-finite losses
    batches_seen = 0  # in this attempt (fault injection counts these)
    for epoch in range(start_epoch, len(stages)):
        stage = stages[epoch]
        if stage == "grqo":
            if reference is None:
                reference = ReferenceModel(engine, cfg.grqo.ref_refresh)
                reference.last_refresh_step = state["step"]
            elif epoch != start_epoch and reference.should_refresh(state["step"], new_epoch=True):
                reference.refresh(engine, state["step"])
        engine.train()
        # resuming mid-epoch: skip the batches of this epoch already trained on (approximate:
        # Ray's streaming split may hand a worker different blocks than last time)
        skip = state.pop("steps_in_epoch", 0) if epoch == start_epoch else 0
        steps_this_epoch = skip
        batches = iter_detection_batches(shard, cfg.data, train=True, epoch=epoch)
        wait_start = time.perf_counter()
        wait_total = compute_total = 0.0
        for batch in batches:
            if skip:
                skip -= 1
                wait_start = time.perf_counter()
                continue
            got_batch = time.perf_counter()
            step = state["step"]
            generator = torch.Generator().manual_seed(_step_seed(cfg.seed, rank, step))
            torch.manual_seed(_step_seed(cfg.seed, rank, step))
            if (reference is not None and stage == "grqo"
                    and reference.kind == "steps" and reference.should_refresh(step, False)):
                reference.refresh(engine, step)
            set_lr(optimizer, base_lrs, lr_factor(step, epoch, cfg))
            state["skipped_samples"] += int(batch["num_skipped"])
            if len(batch["image_ids"]) == 0:
                loss, logs = _empty_loss(engine), {}
            else:
                loss, logs = engine(batch, stage=stage, settings=objective,
                                    reference=reference if stage == "grqo" else None,
                                    generator=generator)
            batches_seen += 1
            if batches_seen in cfg.faults.inject_nonfinite_batches and rank == 0:
                loss = loss * float("nan")  # a rehearsed fault (faults.inject_nonfinite_batches)
            if not _all_finite(loss):  # on every rank: all of them skip this step together
                state["nonfinite_steps"] += 1
                streak.append(batches_seen)
                tracker.log_now({"train/nonfinite_steps": float(state["nonfinite_steps"])},
                                step + 1)
                if rank == 0:
                    print(f"[train] non-finite loss at step {step + 1}: step skipped "
                          f"({len(streak)} in a row, {state['nonfinite_steps']} in all)",
                          file=sys.stderr, flush=True)
                if len(streak) >= cfg.faults.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{len(streak)} consecutive non-finite losses after step {step} "
                        f"(faults.max_consecutive_nonfinite="
                        f"{cfg.faults.max_consecutive_nonfinite}); the last good checkpoint is "
                        f"the newest one in the run folder (step {state.get('saved_step', 0)})")
                wait_start = time.perf_counter()
                continue
            streak.clear()
            engine.backward(loss)
            engine.step()
            state["step"] = step = step + 1
            steps_this_epoch += 1
            steps_done += 1
            done = time.perf_counter()
            wait_total += got_batch - wait_start
            compute_total += done - got_batch
            metrics = {
                **logs, "train/epoch": float(epoch), "train/stage_grqo": float(stage == "grqo"),
                "train/lr": optimizer.param_groups[0]["lr"],  # the head group (backbone: x0.1)
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/samples_per_s": len(batch["image_ids"]) * world / (done - wait_start),
                "train/step_seconds": done - wait_start,
                "train/data_wait_fraction": wait_total / max(wait_total + compute_total, 1e-9),
                "data/skipped_samples": float(state["skipped_samples"]),
            }
            if reference is not None and stage == "grqo":
                metrics.update(reference.stats())
            tracker.log(metrics, step, epoch=epoch, stage=stage)
            if step % cfg.checkpointing.every_steps == 0:
                state["steps_in_epoch"] = steps_this_epoch
                save({k: v for k, v in metrics.items() if k.startswith(("loss/total", "train/"))})
                state.pop("steps_in_epoch")
            wait_start = time.perf_counter()
            if cfg.stages.max_steps_per_epoch and steps_this_epoch >= cfg.stages.max_steps_per_epoch:
                break
        state["epoch"] = epoch + 1
        if cfg.eval.every_epochs and state["epoch"] % cfg.eval.every_epochs == 0:
            _evaluate(cfg, engine, config, tracker, state["step"], epoch)
    save({k: v for k, v in metrics.items() if k.startswith(("loss/total", "train/"))})
    tracker.set_tag("dinor1.workers", json.dumps(gather_placements(rank, steps=steps_done)))
    weights = full_state_dict(engine)  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        tracker.finish(unwrap(engine), weights)
    torch.distributed.barrier()
