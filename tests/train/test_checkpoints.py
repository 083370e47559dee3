"""Checkpoint completeness: a save interrupted part-way never passes for a checkpoint, and
resuming/branching picks the newest complete one. (Real checkpoints written by DeepSpeed pass
the same check in the training, demo, multi-node and object-store tests.)"""

import json
import os
import time

import pytest

from dinor1.errors import UserError
from dinor1.train.launch import checkpoint_problem, latest_checkpoint


def _checkpoint(folder, *, world=2, stage=2, ranks=(0, 1), state=True, step=1):
    (folder / "ds").mkdir(parents=True)
    (folder / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for rank in ranks:
        (folder / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if state is True:
        state = json.dumps({"step": step, "epoch": 0, "world_size": world, "zero_stage": stage})
    if state:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_newest_complete_checkpoint_wins(tmp_path, capsys):
    run = tmp_path / "run"
    good = _checkpoint(run / "checkpoint_2026-01-01_00-00-01.000000", step=2)
    missing_rank = _checkpoint(run / "checkpoint_2026-01-01_00-00-02.000000", ranks=(0,), step=4)
    truncated = _checkpoint(run / "checkpoint_2026-01-01_00-00-03.000000", state='{"step": 6, "ep')
    no_state = _checkpoint(run / "checkpoint_2026-01-01_00-00-04.000000", state=None)
    for age, folder in enumerate([no_state, truncated, missing_rank, good]):
        stamp = time.time() - 10 * age  # mtimes in save order too
        os.utime(folder, (stamp, stamp))
    assert checkpoint_problem(str(missing_rank)) == "rank 1's optimizer partition is missing"
    assert "unreadable" in checkpoint_problem(str(truncated))
    assert "unreadable" in checkpoint_problem(str(no_state))
    assert latest_checkpoint(run) == str(good)
    err = capsys.readouterr().err
    assert "skipped incomplete checkpoints" in err and missing_rank.name in err
    # ZeRO-0 has no optimizer partitions; a one-rank ZeRO-2 checkpoint needs only rank 0's
    assert checkpoint_problem(str(_checkpoint(tmp_path / "z0", stage=0, ranks=()))) is None
    assert checkpoint_problem(str(_checkpoint(tmp_path / "w1", world=1, ranks=(0,)))) is None


def test_incomplete_checkpoint_given_directly_is_refused(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint_x", ranks=(1,))
    with pytest.raises(UserError, match="incomplete: rank 0's optimizer partition is missing"):
        latest_checkpoint(folder)
    with pytest.raises(UserError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path / "empty")
