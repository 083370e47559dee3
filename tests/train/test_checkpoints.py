"""Checkpoint completeness: a save interrupted part-way never passes for a checkpoint, and
resuming/branching picks the newest complete one. (Real checkpoints written by DeepSpeed pass
the same check in the training, restart, demo, multi-node and object-store tests.)"""

import json

import pytest

from dinor1.errors import UserError
from dinor1.train.checkpoints import (
    COMPLETE_NAME,
    checkpoint_dir_name,
    checkpoint_problem,
    checkpoint_step,
    latest_checkpoint,
    newest_complete,
)


def _checkpoint(folder, *, world=2, stage=2, ranks=(0, 1), state=True, step=1, marker=True):
    (folder / "ds").mkdir(parents=True)
    (folder / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for rank in ranks:
        (folder / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if state is True:
        state = json.dumps({"step": step, "epoch": 0, "world_size": world, "zero_stage": stage})
    if state:
        (folder / "trainer_state.json").write_text(state)
    if marker:
        (folder / COMPLETE_NAME).write_text(json.dumps({"step": step, "world_size": world}))
    return folder


def test_newest_complete_checkpoint_wins(tmp_path, capsys):
    run = tmp_path / "run"
    good = _checkpoint(run / checkpoint_dir_name(2, "aa_0"), step=2)
    older = _checkpoint(run / checkpoint_dir_name(1, "bb_0"), step=1)
    missing_rank = _checkpoint(run / checkpoint_dir_name(4, "aa_0"), ranks=(0,), step=4)
    cut_short = _checkpoint(run / checkpoint_dir_name(6, "aa_0"), step=6, marker=False)
    truncated = _checkpoint(run / checkpoint_dir_name(8, "aa_0"), state='{"step": 8, "ep')
    no_state = _checkpoint(run / checkpoint_dir_name(10, "cc_0"), state=None)
    assert checkpoint_step(good.name) == 2 and checkpoint_step("checkpoint_2026-01-01") is None
    assert checkpoint_problem(str(missing_rank)) == "rank 1's optimizer partition is missing"
    assert "no completion marker" in checkpoint_problem(str(cut_short))
    assert "unreadable" in checkpoint_problem(str(truncated))
    assert "unreadable" in checkpoint_problem(str(no_state))
    assert checkpoint_problem(str(older)) is None
    assert latest_checkpoint(run) == str(good)
    err = capsys.readouterr().err
    assert "skipped incomplete checkpoints" in err
    assert all(f.name in err for f in (missing_rank, cut_short, truncated, no_state))
    location, step, skipped = newest_complete(str(run))
    assert (location, step, len(skipped)) == (str(good), 2, 4)
    # ZeRO-0 has no optimizer partitions; a one-rank ZeRO-2 checkpoint needs only rank 0's
    assert checkpoint_problem(str(_checkpoint(tmp_path / "z0", stage=0, ranks=()))) is None
    assert checkpoint_problem(str(_checkpoint(tmp_path / "w1", world=1, ranks=(0,)))) is None


def test_incomplete_checkpoint_given_directly_is_refused(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint_x", ranks=(1,))
    with pytest.raises(UserError, match="incomplete: rank 0's optimizer partition is missing"):
        latest_checkpoint(folder)
    cut = _checkpoint(tmp_path / "checkpoint_y", marker=False)
    with pytest.raises(UserError, match="incomplete: no completion marker"):
        latest_checkpoint(cut)
    with pytest.raises(UserError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path / "empty")
