"""The trainer state a checkpoint restores, and the resume arithmetic (no Ray)."""

import json

import pytest

from dinor1.train.loop import epochs_to_train, report_metrics
from dinor1.train.state import STATE_VERSION, TrainState


def test_round_trip_keeps_every_field():
    state = TrainState(step=37, epoch=2, steps_in_epoch=5, saved_step=30, nonfinite_steps=3,
                       nonfinite_loss_steps=2, nonfinite_grad_steps=1, empty_batches=4,
                       overflow_steps=6, data_quality={"skipped": {"decode": 2}},
                       reference_refresh_step=24, mlflow_run_id="abc", world_size=2,
                       zero_stage=3)
    text = state.to_json()
    assert json.loads(text)["version"] == STATE_VERSION
    assert TrainState.from_json(text) == state


def test_a_state_written_before_the_version_field_loads():
    # the dict an earlier dinor1 wrote (no "version"; keys absent when never counted)
    old = {"step": 12, "epoch": 1, "steps_in_epoch": 4, "data_quality": {},
           "mlflow_run_id": "r", "world_size": 2, "zero_stage": 2, "nonfinite_steps": 1,
           "nonfinite_loss_steps": 1, "reference_refresh_step": 8}
    state = TrainState.from_json(json.dumps(old))
    assert (state.step, state.epoch, state.steps_in_epoch) == (12, 1, 4)
    assert state.reference_refresh_step == 8 and state.nonfinite_grad_steps == 0
    assert state.version == STATE_VERSION


@pytest.mark.parametrize("text, message", [
    ('{"step": 1, "rng": 5}', "unknown trainer state keys ['rng']"),
    (json.dumps({"step": 1, "version": STATE_VERSION + 1}), "newer than this dinor1 reads"),
    ("[1, 2]", "expected a JSON object"),
    ("{step: 1", "not JSON"),
])
def test_a_bad_state_is_refused_naming_the_file(text, message):
    with pytest.raises(ValueError, match="ckpt/trainer_state.json") as info:
        TrainState.from_json(text, source="ckpt/trainer_state.json")
    assert message in str(info.value)


@pytest.mark.parametrize("first, steps_in_epoch, cap, expected", [
    (0, 0, None, [0, 1, 2]),  # a fresh run
    (1, 3, None, [1, 2]),  # resumed mid-epoch 1, no cap: epoch 1 goes on
    (1, 3, 5, [1, 2]),  # mid-epoch under the cap
    (1, 5, 5, [2]),  # saved at epoch 1's last step: nothing left of it
    (1, 6, 5, [2]),  # (more than the cap: an earlier run with a larger cap)
    (3, 0, 5, []),  # saved at the end of training
])
def test_epochs_left_after_a_resume(first, steps_in_epoch, cap, expected):
    assert epochs_to_train(first, 3, steps_in_epoch, cap) == expected


def test_only_the_total_loss_and_train_figures_go_to_ray():
    metrics = {"loss/total": 1.0, "loss/dec0/loss_class": 0.5, "train/lr": 1e-4,
               "grqo/kl_mean": 0.1, "data/skipped_samples": 0.0}
    assert report_metrics(metrics) == {"loss/total": 1.0, "train/lr": 1e-4}
