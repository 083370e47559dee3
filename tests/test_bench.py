"""The benchmark building blocks give sane numbers (the benchmarks themselves are run by hand:
their figures are ratios printed in one run, never asserted on time)."""

from pathlib import Path

import torch

from dinor1.bench.model_step import matmul_peak, run_model_benchmark
from dinor1.config import load_train_config
from dinor1.train.loop import tensor_bytes
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
