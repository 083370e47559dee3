"""Two training benchmarks, each measured in one run:

``dinor1 bench overhead``: Ray Train + DeepSpeed with 1 worker vs a plain PyTorch loop over the
same model, optimiser, objective and batches (issue target <= 1.10). The plain loop reads the
same shards in-process (same decode, cleaning and collate) and is timed on compute only; the Ray
side is timed per step as a user sees it (data wait included) and on compute alone.

``dinor1 bench memory``: per-worker peak memory and optimiser-state bytes with ZeRO-0, -2 and -3
at 2 workers (each rank's figures come back in the run's ``dinor1.workers`` tag); the optimiser
share should shrink ~1/N with ZeRO.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

JOB = "demo"  # the packaged job (jobs/demo.yaml), see dinor1.jobs_index


def _synthetic(work: Path, num_train: int, image_size: int) -> dict:
    from dinor1.data.prepare import synthesize

    return synthesize(str(work / "data"), image_size=image_size, num_train=num_train, num_val=1,
                      num_support=1, workers=2)


def _train(work: Path, name: str, overrides: list[str]):
    """Run a training job; returns (MLflow client, run id, config)."""
    import mlflow

    from dinor1.config import load_train_config
    from dinor1.jobs_index import packaged_job
    from dinor1.train.launch import run_training

    cfg = load_train_config(packaged_job(JOB), [f"checkpointing.storage_path={work / 'runs'}",
                                  "mlflow.log_every_steps=1", f"mlflow.run_name={name}",
                                  "checkpointing.every_steps=100000", *overrides])
    run_training(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    return client, (work / "runs" / name / "mlflow_run_id").read_text().strip(), cfg


def _series(client, run_id: str, name: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


def plain_loop_step_seconds(cfg, shards: str, *, steps: int, skip: int, threads: int) -> float:
    """Median compute time per step of a plain PyTorch loop: the job's model, AdamW parameter
    groups and SFT objective, on batches read in this process from the same shards."""
    import torch

    from dinor1.data.collate import DetectionCollateFn
    from dinor1.data.datasource import iter_shard_rows
    from dinor1.data.pipeline import collate_fn, open_shard_set
    from dinor1.data.transforms import DecodeSample
    from dinor1.model.randomness import step_generators, step_seed
    from dinor1.objectives.step import TrainingObjective, objective_settings
    from dinor1.train.engine import build_model
    from dinor1.train.optim import parameter_groups

    torch.set_num_threads(threads)
    shard_set = open_shard_set(shards)
    decode = DecodeSample(max(cfg.data.train_short_sides), cfg.data.train_max_size,
                          shard_set.category_ids)
    collate: DetectionCollateFn = collate_fn(cfg.data, train=True)
    import numpy as np

    needed = (steps + skip) * cfg.data.batch_size
    raw: list[dict] = []
    for path in shard_set.paths:
        with open(path, "rb") as f:
            raw.extend(r for r in iter_shard_rows(f, path) if not r["error"])
        if len(raw) >= needed:
            break
    raw = raw[:needed]
    columns = {}
    for key in raw[0]:
        columns[key] = np.empty(len(raw), dtype=object)
        columns[key][:] = [r[key] for r in raw]
    decoded = decode(columns)  # the Ray Data map's function, on one batch of rows
    size = cfg.data.batch_size
    batches = [collate({k: v[i:i + size] for k, v in decoded.items()})
               for i in range(0, needed, size)]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.optimizer.lr,
                                  betas=cfg.optimizer.betas)
    objective = TrainingObjective(model)
    settings = objective_settings(cfg, model.config.num_queries)
    times = []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        generators = step_generators(step_seed(cfg.seed, 0, step), batch["pixel_values"].device)
        loss, _ = objective(batch, stage="sft", settings=settings, generators=generators)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[skip:])


def run_overhead_benchmark(*, steps: int = 40, skip: int = 5, image_size: int = 128,
                           work_dir: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    work = Path(work_dir or tempfile.mkdtemp(prefix="dinor1-bench-overhead-"))
    dirs = _synthetic(work, max(400, (steps + skip) * 4 + 40), image_size)
    client, run_id, cfg = _train(work, "bench-overhead", [
        f"data.train_shards={dirs['train']}", f"stages.max_steps_per_epoch={steps + skip}",
        "stages.sft_epochs=1", "stages.grqo_epochs=0", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", *overrides])
    step_s = statistics.median(_series(client, run_id, "train/step_seconds")[skip:])
    compute_s = statistics.median(_series(client, run_id, "train/compute_seconds")[skip:])
    worker = json.loads(client.get_run(run_id).data.tags["dinor1.workers"])[0]
    plain = plain_loop_step_seconds(cfg, dirs["train"], steps=steps, skip=skip,
                                    threads=int(worker["torch_threads"]))
    result = {"ray_step_s": step_s, "ray_compute_s": compute_s, "plain_step_s": plain,
              "ratio": step_s / plain, "compute_ratio": compute_s / plain}
    print(f"1 worker, {cfg.model.init}, ZeRO-{cfg.deepspeed.zero_stage}, batch "
          f"{cfg.data.batch_size}, {image_size}px, {worker['torch_threads']} torch threads "
          f"(medians of {steps} steps):")
    print(f"  Ray Train + DeepSpeed step (with data wait) {step_s * 1000:8.1f} ms")
    print(f"  Ray Train + DeepSpeed compute only          {compute_s * 1000:8.1f} ms")
    print(f"  plain PyTorch loop step                     {plain * 1000:8.1f} ms")
    print(f"  Ray+DeepSpeed / plain                       {result['ratio']:8.2f}   "
          "(target <= 1.10)")
    print(f"  compute only / plain                        {result['compute_ratio']:8.2f}")
    return result


def run_memory_benchmark(*, stages: tuple[int, ...] = (0, 2, 3), steps: int = 6,
                         image_size: int = 128, work_dir: str | None = None,
                         overrides: tuple[str, ...] = ()) -> dict:
    work = Path(work_dir or tempfile.mkdtemp(prefix="dinor1-bench-memory-"))
    dirs = _synthetic(work, max(200, steps * 8 + 40), image_size)
    rows = {}
    for stage in stages:
        client, run_id, cfg = _train(work, f"bench-zero{stage}", [
            f"data.train_shards={dirs['train']}", f"stages.max_steps_per_epoch={steps}",
            "stages.sft_epochs=1", "stages.grqo_epochs=0", "scaling.num_workers=2",
            f"deepspeed.zero_stage={stage}", *overrides])
        rows[stage] = json.loads(client.get_run(run_id).data.tags["dinor1.workers"])
    base = rows[stages[0]]
    print(f"per-worker memory, {cfg.model.init}, 2 workers, batch {cfg.data.batch_size}, "
          f"{image_size}px, {steps} SFT steps:")
    print(f"  ZeRO  rank  peak RSS MB  optimizer state MB (Adam moments)  "
          f"state / ZeRO-{stages[0]}  moments / ZeRO-{stages[0]}")
    for stage, workers in rows.items():
        for w, b in zip(workers, base):
            share = w["optimizer_state_mb"] / max(b["optimizer_state_mb"], 1e-9)
            moments = w["adam_moments_mb"] / max(b["adam_moments_mb"], 1e-9)
            print(f"  {stage:4d}  {w['rank']:4d}  {w['peak_rss_mb']:11.0f}  "
                  f"{w['optimizer_state_mb']:18.1f} ({w['adam_moments_mb']:6.1f})  "
                  f"{share:15.2f}  {moments:17.2f}")
    print("  (ZeRO's state also holds an fp32 master partition of the weights: 1/N of them)")
    return rows
