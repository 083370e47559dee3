"""Faults during training, rehearsed on the real stack (Ray Train, DeepSpeed ZeRO-2 over gloo,
MLflow on sqlite): a non-finite loss is skipped on every worker, counted and logged; too many in
a row stop the run with a clear message and a checkpoint from before them. Two runs rehearse
every drill: ZeRO-2 in this process, ZeRO-0 through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from dinor1.config import load_train_config
from tests.helpers import synthetic_train_shards

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    return synthetic_train_shards(out, 80, 8)  # 10 batches of 4 per worker


def _overrides(shards, tmp_path, *extra) -> list[str]:
    return [f"data.train_shards={shards}", "data.train_short_sides=[96]", "data.train_max_size=96",
            "stages.max_steps_per_epoch=8", "stages.sft_epochs=1", "stages.grqo_epochs=0",
            "checkpointing.every_steps=2", f"checkpointing.storage_path={tmp_path}",
            "mlflow.log_every_steps=1", *extra]


def _config(shards, tmp_path, *extra):
    return load_train_config(ROOT / "jobs" / "demo.yaml", _overrides(shards, tmp_path, *extra))


def _history(tmp_path, name):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "demo" / "mlflow_run_id").read_text().strip()
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, name),
                                               key=lambda m: (m.step, m.timestamp))]


@pytest.mark.ray
@pytest.mark.slow
def test_nonfinite_losses_and_gradients_are_skipped_counted_and_logged(ray_cluster, shards,
                                                                       tmp_path):
    """ZeRO-2, rank 0 only: NaN gradients with a finite loss at the 2nd and 6th batches
    (DeepSpeed's own overflow check, across ranks), a NaN loss at the 4th, NaN logits inside the
    8th batch's forward (the Hungarian matching sees them first and must not raise); every
    worker skips each of them together (with the visual-text contrastive loss on: the shards'
    class names, the text encoder), the weights stay finite and every skip is counted."""
    from dinor1.train.launch import run_training

    result = run_training(_config(shards, tmp_path, "faults.inject_nonfinite_grad_batches=[2,6]",
                                  "faults.inject_nonfinite_batches=[4]",
                                  "faults.inject_nonfinite_logits_batches=[8]",
                                  "objectives.contrastive=true"))
    assert result.error is None
    # 10 batches, 4 skipped: 6 optimiser steps, all finite; a skip is logged at the step it
    # would have been
    losses = _history(tmp_path, "loss/total")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(v == v and abs(v) != float("inf") for _, v in losses)
    assert [s for s, _ in _history(tmp_path, "loss/contrastive")] == [1, 2, 3, 4, 5, 6]
    assert _history(tmp_path, "train/nonfinite_grad_steps") == [(2, 1.0), (4, 2.0)]
    assert _history(tmp_path, "train/nonfinite_loss_steps") == [(3, 1.0), (5, 2.0)]
    assert _history(tmp_path, "train/nonfinite_steps") == [(2, 1.0), (3, 2.0), (4, 3.0),
                                                           (5, 4.0)]
    checksums = _history(tmp_path, "checkpoint/weights_checksum")
    assert checksums and all(v == v and abs(v) != float("inf") for _, v in checksums)
    state = json.loads(sorted(p for p in (tmp_path / "demo").glob("checkpoint_*/trainer_state.json")
                              )[-1].read_text())
    assert state["step"] == 6 and state["nonfinite_steps"] == 4


@pytest.mark.ray
@pytest.mark.slow
def test_zero0_skips_nonfinite_gradients_and_consecutive_ones_stop_the_run(ray_address, shards,
                                                                           tmp_path):
    """ZeRO-0 (dinor1's own check of the all-reduced gradients): NaN gradients on rank 0 only
    at the 2nd and 5th batches are skipped on every rank; then 3 non-finite losses in a row
    stop the run, through the CLI: exit 1 and one line naming the cause and the last good
    checkpoint."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dinor1"), "train", str(ROOT / "jobs" / "demo.yaml"),
         "--address", ray_address,
         *_overrides(shards, tmp_path, "stages.max_steps_per_epoch=10", "deepspeed.zero_stage=0",
                     "faults.inject_nonfinite_grad_batches=[2,5]",
                     "faults.inject_nonfinite_batches=[7,8,9,10]",
                     "faults.max_consecutive_nonfinite=3")],
        capture_output=True, text=True, timeout=540)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # (Ray may still forward worker log lines after ours)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dinor1: training failed: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    last = lines[0]
    assert "NonFiniteLossError" in last and "Traceback" not in last
    assert "3 consecutive non-finite losses or gradients after step 4" in last
    assert "last good checkpoint is the newest one in the run folder (step 4)" in last
    # the skipped gradients: counted, the weights finite
    assert _history(tmp_path, "train/nonfinite_grad_steps") == [(2, 1.0), (4, 2.0)]
    losses = _history(tmp_path, "loss/total")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert all(v == v and abs(v) != float("inf") for _, v in losses)
    checksums = _history(tmp_path, "checkpoint/weights_checksum")
    assert checksums and all(v == v and abs(v) != float("inf") for _, v in checksums)
    # the newest checkpoint is the last good one: step 4, written before the bad steps
    states = [json.loads(p.read_text())
              for p in (tmp_path / "demo").glob("checkpoint_*/trainer_state.json")]
    assert max(s["step"] for s in states) == 4
    assert _history(tmp_path, "train/nonfinite_steps")[-1] == (5, 5.0)
