"""The benchmark building blocks give sane numbers (the benchmarks themselves are run by hand:
their figures are ratios printed in one run, never asserted on time)."""

from pathlib import Path

import pytest
import torch

from dinor1.bench.model_step import matmul_peak, run_model_benchmark
from dinor1.config import load_train_config
from dinor1.train.diagnostics import tensor_bytes
from tests.helpers import synthetic_train_shards


def test_flops_and_mfu_are_counted_against_a_measured_peak():
    assert matmul_peak(torch.device("cpu"), torch.float32, size=256, seconds=0.2) > 1e8
    result = run_model_benchmark(batch_size=1, image_size=64, steps=1, warmup=1)
    assert result["flops_per_step"] > 1e7  # forward + backward matmuls of tiny-cpu
    assert 0 < result["mfu"] < 1


def test_tensor_bytes_counts_nested_state():
    state = {"state": {0: {"exp_avg": torch.zeros(10), "step": torch.tensor(3.0)}},
             "groups": [torch.zeros(2, 2, dtype=torch.float64)]}
    assert tensor_bytes(state) == 10 * 4 + 4 + 4 * 8


def test_plain_loop_runs_the_jobs_model_objective_and_batches(tmp_path):
    from dinor1.bench.train_overhead import plain_loop_step_seconds

    shards = synthetic_train_shards(tmp_path, 16, 16)
    cfg = load_train_config(Path(__file__).parents[1] / "jobs" / "demo.yaml", [f"data.train_shards={shards}",
                                               "data.train_short_sides=[96]"])
    assert plain_loop_step_seconds(cfg, str(shards), steps=2, skip=1, threads=1) > 0


@pytest.mark.ray
def test_ray_node_cpu_accounting_sees_the_task_workers(ray_cluster):
    """The data benchmark's CPU accounting (psutil over the Ray node this process started)
    attributes a task's CPU to the task workers and this process's to the consumer."""
    import time

    from dinor1.bench.data_throughput import ray_node_cpu_seconds

    @ray_cluster.remote
    def burn(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass
        return True

    assert ray_cluster.get(burn.remote(0.01))  # a worker exists before the first snapshot
    before = ray_node_cpu_seconds()
    assert ray_cluster.get(burn.remote(0.6))
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass
    after = ray_node_cpu_seconds()
    used = {k: after[k] - before[k] for k in after}
    assert 0.5 <= used["task_workers"] < 2.0
    assert used["consumer"] >= 0.25
    assert set(used) == {"consumer", "task_workers", "actors", "daemons"}


def test_objective_steps_time_sft_and_grqo_without_ray():
    """The GPU benchmark of the real SFT and GRQO steps runs (here on CPU, bf16 autocast as on
    a GPU) and imports nothing a bare PyTorch machine lacks (Ray, DeepSpeed, pydantic, MLflow)."""
    import subprocess
    import sys

    code = ("import sys; from dinor1.bench.objective_steps import main; "
            "r = main(['--steps', '1', '--warmup', '1', '--bf16', '--device', 'cpu']); "
            "print(sorted(m for m in ('ray', 'deepspeed', 'pydantic', 'mlflow') "
            "if m in sys.modules)); print(r['grqo_flops'] > r['sft_flops'] > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2:] == ["[]", "True"]  # no such import; GRQO counts the reference's FLOPs too
    assert "GRQO / SFT step" in out.stdout


def test_gpu_check_says_in_one_line_what_is_missing():
    """bench/gpu_check.sh on a machine without a GPU (this one): one line, exit 1, nothing run."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    out = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "gpu_check: missing: a CUDA device (torch.cuda.is_available() is false)"]
    assert out.stdout == ""
