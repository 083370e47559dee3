"""SFT vs GRQO step time per worker and the data-wait fraction, measured in one training run.

Runs the demo job (tiny-cpu, 2 workers, DeepSpeed ZeRO-2, batch 4 per worker) for
``steps`` SFT steps then ``steps`` GRQO steps on synthetic shards, reads the per-step metrics
back from the run's MLflow store and prints the medians (the first ``skip`` steps of each stage
are warm-up) and the GRQO / SFT ratio (issue target <= 1.25).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path


def run_train_benchmark(*, steps: int = 40, skip: int = 5, image_size: int = 128,
                        work_dir: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    import mlflow

    from dinor1.config import load_train_config
    from dinor1.data.prepare import synthesize
    from dinor1.jobs_index import packaged_job
    from dinor1.train.launch import run_training

    work = Path(work_dir or tempfile.mkdtemp(prefix="dinor1-bench-train-"))
    dirs = synthesize(str(work), image_size=image_size, num_train=max(400, steps * 8 + 80),
                      num_val=1, num_support=1, workers=2)
    cfg = load_train_config(packaged_job("demo"), [
        f"data.train_shards={dirs['train']}", f"stages.max_steps_per_epoch={steps}",
        "stages.sft_epochs=1", "stages.grqo_epochs=1", f"checkpointing.storage_path={work}/runs",
        f"checkpointing.every_steps={10 * steps}", "mlflow.log_every_steps=1",
        "mlflow.run_name=bench-train", *overrides])
    run_training(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    run_id = (work / "runs" / "bench-train" / "mlflow_run_id").read_text().strip()

    def series(name):
        return [m.value for m in sorted(client.get_metric_history(run_id, name),
                                        key=lambda m: m.step)]

    seconds, grqo_flag = series("train/step_seconds"), series("train/stage_grqo")
    waits = series("train/data_wait_fraction")
    steady = series("train/data_wait_fraction_steady")
    start_waits = series("train/epoch_start_wait_seconds")
    sft = [s for s, g in zip(seconds, grqo_flag) if not g][skip:]
    grqo = [s for s, g in zip(seconds, grqo_flag) if g][skip:]
    result = {"sft_step_s": statistics.median(sft), "grqo_step_s": statistics.median(grqo)}
    result["grqo_over_sft"] = result["grqo_step_s"] / result["sft_step_s"]
    result["data_wait_fraction"] = waits[-1]  # cumulative over the last epoch
    result["data_wait_fraction_steady"] = steady[-1]  # ... without its first batch
    result["epoch_start_wait_s"] = start_waits[-1]
    print(f"train steps ({cfg.model.init}, {cfg.scaling.num_workers} workers, ZeRO-"
          f"{cfg.deepspeed.zero_stage}, batch {cfg.data.batch_size}/worker, {image_size}px):")
    print(f"  SFT step per worker   {result['sft_step_s'] * 1000:8.0f} ms (median of {len(sft)})")
    print(f"  GRQO step per worker  {result['grqo_step_s'] * 1000:8.0f} ms (median of {len(grqo)})")
    print(f"  GRQO / SFT            {result['grqo_over_sft']:8.2f}   (target <= 1.25)")
    print(f"  data-wait fraction    {result['data_wait_fraction']:8.3f}   (target < 0.05; the last "
          f"epoch, {steps} steps)")
    print(f"    without the epoch's first batch  {result['data_wait_fraction_steady']:.3f}; that "
          f"first batch waited {result['epoch_start_wait_s']:.2f} s (Ray Data starting the "
          "epoch)")
    return result
