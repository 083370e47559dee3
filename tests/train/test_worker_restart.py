"""A training worker killed mid-run, by PID, on the real stack (Ray Train V2, DeepSpeed ZeRO-2
over gloo, MLflow on sqlite): Ray Train restarts the worker group from the newest checkpoint
(FailureConfig), the run reaches its last step in the same MLflow run, and - with
``data.preserve_order`` - ends with exactly the weights, optimiser state and GRQO reference of
an uninterrupted run with the same seed."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest

from dinor1.config import load_train_config
from tests.helpers import synthetic_train_shards

ROOT = Path(__file__).parents[2]
STEPS_PER_EPOCH = 8


def _config(shards, storage, *extra):
    return load_train_config(ROOT / "jobs" / "demo.yaml", [
        f"data.train_shards={shards}", "data.batch_size=4", "data.train_short_sides=[96]",
        "data.train_max_size=96", "data.preserve_order=true",
        f"stages.max_steps_per_epoch={STEPS_PER_EPOCH}", "stages.sft_epochs=1",
        "stages.grqo_epochs=1", "checkpointing.every_steps=3",
        f"checkpointing.storage_path={storage}", "mlflow.log_every_steps=1", *extra])


def _run(storage: Path):
    client = mlflow.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    return client, (storage / "demo" / "mlflow_run_id").read_text().strip()


def _history(client, run_id, key) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        out.setdefault(m.step, []).append(m.value)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_into_the_same_run(ray_cluster, tmp_path):
    from dinor1.train.launch import run_training

    shards = synthetic_train_shards(tmp_path / "data", STEPS_PER_EPOCH * 2 * 4, 16)
    last = 2 * STEPS_PER_EPOCH
    assert run_training(_config(shards, tmp_path / "straight")).error is None

    storage = tmp_path / "killed"
    killed: dict = {}

    def kill_rank_1():
        # when step 5 is logged (a checkpoint at step 3 exists, the next is at 6): SIGKILL the
        # process of rank 1, found from the placements rank 0 logged to the run
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                client, run_id = _run(storage)
                if len(_history(client, run_id, "loss/total")) >= 5:
                    workers = json.loads(client.get_run(run_id).data.tags["dinor1.workers"])
                    break
            except Exception:  # noqa: BLE001 - the run or its tags are not there yet
                pass
            time.sleep(0.05)
        else:
            return
        killed["pid"] = next(w["pid"] for w in workers if w["rank"] == 1)
        killed["after_step"] = max(_history(client, run_id, "loss/total"))
        os.kill(killed["pid"], signal.SIGKILL)

    chaos = threading.Thread(target=kill_rank_1, daemon=True)
    chaos.start()
    result = run_training(_config(shards, storage, "checkpointing.max_failures=1"))
    chaos.join(timeout=60)
    assert result.error is None and "pid" in killed
    assert killed["after_step"] < last  # it was killed mid-run

    client, run_id = _run(storage)
    straight_client, straight_id = _run(tmp_path / "straight")
    # the restarted workers resumed from a checkpoint taken before the kill, in the same run
    resumed_at = [v for vs in _history(client, run_id, "resume/step").values() for v in vs]
    assert len(resumed_at) == 1 and resumed_at[0] % 3 == 0
    assert 0 < resumed_at[0] <= killed["after_step"]
    workers = json.loads(client.get_run(run_id).data.tags["dinor1.workers"])
    assert killed["pid"] not in [w["pid"] for w in workers]
    assert [w["steps"] for w in workers] == [last - resumed_at[0]] * 2

    # metrics continue from the checkpoint step: every step is there; the replayed ones twice,
    # with the same loss both times (the restart replays the same batches and random draws)
    losses = _history(client, run_id, "loss/total")
    assert sorted(losses) == list(range(1, last + 1))
    for step, values in losses.items():
        assert len(set(values)) == 1, (step, values)
        assert len(values) == 1 or resumed_at[0] < step, step  # only what came after it
    straight = _history(straight_client, straight_id, "loss/total")
    assert {s: v[0] for s, v in losses.items()} == {s: v[0] for s, v in straight.items()}
    # ...and the end state is bit-identical to the uninterrupted run's
    for part in ("weights", "optimizer", "reference"):
        key = f"checkpoint/{part}_checksum"
        assert (_history(client, run_id, key)[last][-1]
                == _history(straight_client, straight_id, key)[last][-1]), part
