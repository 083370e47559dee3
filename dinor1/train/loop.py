"""The per-worker training recipe run by Ray Train's ``TorchTrainer`` (one per worker).

Read top to bottom: :func:`train_loop_per_worker` sets up, restores, trains every epoch of the
stage schedule (SFT then GRQO, ``train/stages.py``) step by step, and finishes. What one step
does is ``train/step.py``; checkpoints are ``train/checkpoints.py``; the state a checkpoint
restores is ``train/state.py``. Every step is deterministic given (seed, rank, step): the
prompt and CDN generators (host and device, ``model/randomness.py``) and torch's global RNG are
re-seeded from them, so a resumed run needs no saved RNG state. Rank 0 logs to MLflow into the
run the driver created.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import uuid

import torch

from dinor1.train.settings import WorkerSettings
from dinor1.train.step import StepOutcome


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point: ``config`` is :meth:`WorkerSettings.for_ray`."""
    recipe = TrainingRecipe(WorkerSettings.model_validate(config))
    recipe.restore()
    recipe.train()
    recipe.finish()


def epochs_to_train(first: int, num_epochs: int, steps_in_epoch: int,
                    cap: int | None) -> list[int]:
    """The epochs a run starting at ``first`` still trains: all from there, less ``first`` when
    a checkpoint saved at its last step (``steps_in_epoch`` reached the cap) resumes it."""
    done = bool(cap) and steps_in_epoch >= cap
    return [e for e in range(first, num_epochs) if not (e == first and done)]


def report_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """What goes to Ray Train with a checkpoint: the total loss and the ``train/*`` figures."""
    return {k: v for k, v in metrics.items() if k.startswith(("loss/total", "train/"))}


class TrainingRecipe:
    """One worker's run: :meth:`restore`, :meth:`train`, :meth:`finish` (in that order)."""

    def __init__(self, settings: WorkerSettings):
        import ray.train

        from dinor1.data.quality import QualityCounter
        from dinor1.train.engine import build_engine
        from dinor1.train.guards import FaultDrill, NonFiniteStreak
        from dinor1.train.stages import GRQOReference, StageSchedule
        from dinor1.train.state import TrainState
        from dinor1.train.tracking import RankZeroTracker, gather_placements

        # transformers' deformable attention checks its spatial shapes against the sequence
        # length on every call, a device-to-host sync each (~20 per step); dinor1 builds both
        # from the same features, so the check cannot fail here (set it to 0 to have it back)
        os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
        self.settings = settings
        self.cfg = cfg = settings.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(cfg.seed)
        self.training = build_engine(cfg, settings.class_names)
        self.engine, self.optimizer = self.training.engine, self.training.optimizer
        self.schedule = StageSchedule(cfg)
        self.reference = GRQOReference(cfg.grqo.ref_refresh)
        self.state = TrainState()
        self.quality = QualityCounter()  # skipped samples and dropped boxes, by kind
        self.drill = FaultDrill(cfg.faults, self.rank)
        self.streak = NonFiniteStreak(cfg.faults.max_consecutive_nonfinite)
        self.tracker = RankZeroTracker(settings, self.rank, self.world)
        self.tracker.set_tag("dinor1.workers", json.dumps(gather_placements(self.rank)))
        self.steps_done = 0  # by this worker in this attempt (a restart starts again at 0)
        self.saves: list[int] = []  # the steps this attempt saved at (names its checkpoints)
        self.metrics: dict[str, float] = {}  # the last step's

    def restore(self) -> None:
        """Resume from this run's newest checkpoint, or branch from ``start_from``, if any."""
        from dinor1.objectives.step import objective_settings
        from dinor1.train.checkpoints import (
            broadcast_from_rank0,
            load_checkpoint,
            restore_point,
        )
        from dinor1.train.diagnostics import state_checksums

        checkpoint = restore_point(self.settings.run_folder, self.settings.start_from,
                                   self.rank)
        # names this attempt's checkpoints
        self.attempt = broadcast_from_rank0(uuid.uuid4().hex[:8], self.rank)
        if checkpoint is not None:
            self.state = load_checkpoint(checkpoint, self.engine, self.reference, self.world)
            resized_from = self.state.world_size
            if resized_from != self.world:
                # the batches of the epoch already trained on, counted in this group's steps
                # (each step now takes world_size batches)
                done = self.state.steps_in_epoch * resized_from
                self.state.steps_in_epoch = -(-done // self.world)
                self.tracker.set_tag("dinor1.resized", f"{resized_from} -> {self.world} workers "
                                     f"at step {self.state.step}")
            if self.rank == 0:  # saved totals are sums over all ranks: restored on one rank
                self.quality.load_state_dict(self.state.data_quality)
                progress = self.tracker.progress
                progress.write(f"[train {progress.name}] resumed at step {self.state.step} "
                               f"on {self.world} worker{'s' * (self.world > 1)}" +
                               (f" (was {resized_from})" if resized_from != self.world else ""))
            # (lets a user, and the tests, check what was restored)
            sums = state_checksums(self.engine, self.reference.model)
            self.tracker.log_now({"resume/step": float(self.state.step),
                                  "resume/world_size_before": float(resized_from),
                                  "resume/world_size": float(self.world),
                                  **{f"resume/{k}_checksum": v for k, v in sums.items()}},
                                 self.state.step)
        # (a checkpoint's query count is known only now)
        self.objective = objective_settings(self.cfg, self.training.model.config.num_queries)

    def train(self) -> None:
        """Every epoch left, in stage order; the next epoch's data starts while this one's last
        batches train (``data/epochs.py``)."""
        import ray.train

        from dinor1.data.epochs import EpochBatches
        from dinor1.data.pipeline import iter_detection_batches

        cfg, state = self.cfg, self.state
        first, skip, cap = state.epoch, state.steps_in_epoch, cfg.stages.max_steps_per_epoch
        todo = epochs_to_train(first, len(self.schedule), skip, cap)
        shard = ray.train.get_dataset_shard("train")
        self.epoch_batches = EpochBatches(
            lambda e: iter_detection_batches(shard, cfg.data, train=True, epoch=e), todo,
            lookahead=cfg.data.epoch_lookahead_batches, limit=cap or None)
        try:
            for epoch in range(first, len(self.schedule)):
                stage = self.schedule[epoch]
                self.reference.begin_epoch(self.engine, stage, state.step, epoch == first)
                self.engine.train()
                if epoch in todo:
                    # resuming mid-epoch: skip the batches of this epoch already trained on
                    # (approximate: Ray's streaming split may hand out other blocks than before)
                    self.train_epoch(epoch, stage, skip=skip if epoch == first else 0)
                state.epoch, state.steps_in_epoch = epoch + 1, 0
                if cfg.eval.every_epochs and state.epoch % cfg.eval.every_epochs == 0:
                    self.evaluate(epoch)
        finally:
            self.epoch_batches.close()

    def train_epoch(self, epoch: int, stage: str, skip: int) -> None:
        from dinor1.train.diagnostics import StepTimer

        cap = self.cfg.stages.max_steps_per_epoch
        timer = StepTimer()
        batches = self.epoch_batches.batches(epoch)
        for batch in timer.timed(itertools.islice(batches, skip, None)):
            if self.step(batch, epoch, stage, timer) and cap and self.state.steps_in_epoch >= cap:
                break
        if hasattr(batches, "close"):  # left at the cap: drop what is buffered of this epoch
            batches.close()

    def step(self, batch: dict, epoch: int, stage: str, timer) -> bool:
        """One step; returns whether it counted (a skipped step changed nothing)."""
        from dinor1.train.optim import lr_factor, set_lr
        from dinor1.train.step import step_seeded, train_step

        cfg, state = self.cfg, self.state
        started = time.monotonic()
        generators = step_seeded(cfg.seed, self.rank, state.step, batch["pixel_values"].device)
        self.reference.before_step(self.engine, stage, state.step)
        set_lr(self.optimizer, self.training.base_lrs, lr_factor(state.step, epoch, cfg))
        self.quality.update(batch)
        result = train_step(self.engine, batch, stage=stage, settings=self.objective,
                            reference=self.reference.for_stage(stage), generators=generators,
                            zero_stage=cfg.deepspeed.zero_stage,
                            precision=cfg.deepspeed.precision, drill=self.drill)
        if result.outcome is not StepOutcome.OK:
            self.skipped(result.outcome, epoch)
            return False
        self.streak.good()
        state.step += 1
        state.steps_in_epoch += 1
        self.steps_done += 1
        self.metrics = self.step_metrics(result.logs, batch, epoch, stage, timer)
        self.tracker.log(self.metrics, state.step, epoch=epoch, stage=stage)
        if state.step % cfg.checkpointing.every_steps == 0:
            self.save()
        if cfg.faults.min_step_seconds:  # (a drill)
            time.sleep(max(0.0, cfg.faults.min_step_seconds - (time.monotonic() - started)))
        return True

    def step_metrics(self, logs: dict, batch: dict, epoch: int, stage: str, timer) -> dict:
        metrics = {
            **logs, "train/epoch": float(epoch), "train/stage_grqo": float(stage == "grqo"),
            "train/lr": self.optimizer.param_groups[0]["lr"],  # the head group (backbone x0.1)
            "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            **timer.step_metrics(len(batch["image_ids"]) * self.world)}
        if self.state.step % self.cfg.mlflow.log_every_steps == 0:  # same steps on all ranks
            metrics.update(self.quality.metrics("data/"))  # collective: every rank
        metrics.update(self.reference.stats(stage))
        return metrics

    def skipped(self, outcome: StepOutcome, epoch: int) -> None:
        """Count and log a skipped step; stop the run after too many non-finite ones."""
        state, step = self.state, self.state.step
        self.epoch_batches.extend(epoch)  # this batch did not count toward the cap
        if outcome is StepOutcome.EMPTY_BATCH:
            state.empty_batches += 1
            self.tracker.log_now({"train/empty_batches": float(state.empty_batches)}, step + 1)
            return
        if outcome is StepOutcome.OVERFLOW:
            state.overflow_steps += 1
            self.tracker.log_now({"train/fp16_overflow_steps": float(state.overflow_steps)},
                                 step + 1)
            return
        bad = "loss" if outcome is StepOutcome.NONFINITE_LOSS else "gradients"
        key = "nonfinite_loss_steps" if bad == "loss" else "nonfinite_grad_steps"
        state.nonfinite_steps += 1
        setattr(state, key, getattr(state, key) + 1)
        in_a_row = self.streak.bad()
        self.tracker.log_now({"train/nonfinite_steps": float(state.nonfinite_steps),
                              f"train/{key}": float(getattr(state, key))}, step + 1)
        if self.rank == 0:
            print(f"[train] non-finite {bad} at step {step + 1}: step skipped ({in_a_row} in a "
                  f"row, {state.nonfinite_steps} in all)", file=sys.stderr, flush=True)
        self.streak.check(step, state.saved_step)

    def save(self) -> None:
        """A checkpoint of this step on every rank, reported to Ray Train."""
        from dinor1.train.checkpoints import checkpoint_dir_name, save_checkpoint
        from dinor1.train.diagnostics import state_checksums

        state = self.state
        # (the end of training right after a periodic save is a second save at that step)
        name = checkpoint_dir_name(state.step, f"{self.attempt}_{self.saves.count(state.step)}")
        self.saves.append(state.step)
        state.data_quality = self.quality.totals().state_dict()  # collective: every rank
        state.mlflow_run_id = self.settings.mlflow_run_id
        state.world_size, state.zero_stage = self.world, self.cfg.deepspeed.zero_stage

        def log_checksums(folder: str) -> None:  # collective under ZeRO-3
            sums = state_checksums(self.engine, self.reference.model)
            self.tracker.log_now({f"checkpoint/{k}_checksum": v for k, v in sums.items()},
                                 state.step)

        save_checkpoint(self.engine, state, self.reference, rank=self.rank, name=name,
                        run_folder=self.settings.run_folder,
                        metrics=report_metrics(self.metrics), after_save=log_checksums)

    def evaluate(self, epoch: int) -> None:
        """Generic-prompt AP on the val split (every rank takes part; rank 0 logs)."""
        import ray.train

        from dinor1.data.pipeline import iter_detection_batches
        from dinor1.eval.during_training import evaluate_during_training

        cfg, step = self.cfg, self.state.step
        started = time.perf_counter()
        data = cfg.data.model_copy(update={"batch_size": cfg.eval.batch_size})
        skipped: list[str] = []
        metrics = evaluate_during_training(
            self.training.model,
            iter_detection_batches(ray.train.get_dataset_shard("val"), data, train=False),
            iter_detection_batches(ray.train.get_dataset_shard("support"), data, train=False),
            self.settings.eval_categories, per_class=cfg.eval.prompts_per_class,
            top_k=cfg.eval.top_k, chunk_size=cfg.eval.prompt_chunk_size, skipped_errors=skipped)
        if metrics:  # (rank 0)
            if skipped:
                self.tracker.log_text("".join(f"{e}\n" for e in skipped),
                                      "eval/skipped_samples.txt")
            metrics["eval/seconds"] = time.perf_counter() - started
            metrics["train/epochs_done"] = float(epoch + 1)
            self.tracker.log_now(metrics, step)
            print(f"[eval] epoch {epoch} step {step}: AP {metrics['eval/generic/AP']:.3f} "
                  f"AP50 {metrics['eval/generic/AP50']:.3f}", flush=True)
        # every rank reports (rank 0 with the metrics): what a Ray Tune scheduler (ASHA in
        # `dinor1 sweep`) decides on, through the trial's Ray Train callback
        ray.train.report(metrics)

    def finish(self) -> None:
        """The last checkpoint, the data-quality totals, the final model, the end of the run."""
        from dinor1.model.wrapped import full_state_dict
        from dinor1.train.checkpoints import export_final_model
        from dinor1.train.diagnostics import memory_use
        from dinor1.train.tracking import gather_placements

        self.save()
        self.tracker.log_now(self.quality.metrics("data/"), self.state.step)  # collective
        skipped = self.quality.gather_errors()  # collective: every rank
        if skipped:
            self.tracker.log_text("".join(f"{e}\n" for e in skipped), "data/skipped_samples.txt")
        self.tracker.set_tag("dinor1.workers", json.dumps(gather_placements(
            self.rank, steps=self.steps_done, **memory_use(self.engine))))
        weights = full_state_dict(self.engine)  # collective under ZeRO-3: every rank
        if self.rank == 0:
            final = export_final_model(self.training.model, weights,
                                       self.settings.final_model_dir)
            self.tracker.finish(final, self.state.step)
        torch.distributed.barrier()
