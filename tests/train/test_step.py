"""What one training step does with a good batch, an empty one and non-finite ones: a real
DeepSpeed engine (ZeRO-0 and ZeRO-2, gloo, one process), no Ray."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dinor1.config import FaultsSection
from dinor1.train.diagnostics import StepTimer
from dinor1.train.guards import FaultDrill, NonFiniteLossError, NonFiniteStreak
from dinor1.train.step import StepOutcome, train_step


class ToyObjective(nn.Module):
    """Stands in for ``TrainingObjective``: the same call (batch, keywords) -> (loss, logs), and
    a ``prompt_classifier`` for the NaN-logits drill."""

    def __init__(self):
        super().__init__()
        self.prompt_classifier = nn.Linear(3, 1)

    def forward(self, batch, **kwargs):
        loss = (self.prompt_classifier(batch["pixel_values"]) - 1.0).pow(2).mean()
        return loss, {"loss/total": float(loss.detach())}


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        patch.setenv(key, value)  # what a launcher sets (DeepSpeed checks LOCAL_RANK)
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    patch.undo()


def _engine(zero_stage: int):
    import deepspeed

    from dinor1.train.engine import _no_compile_decorators

    # as build_engine does: no JIT build of DeepSpeed's CPU shared-memory all-reduce (27 s of g++
    # in the first test process of a fresh venv; the others waited for its lock), no inductor
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = ToyObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with _no_compile_decorators():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9})
    return engine


def _batch(images: int = 2):
    return {"pixel_values": torch.ones(images, 3), "image_ids": list(range(images))}


def _weights(engine) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])


def _step(engine, batch, zero_stage, drill):
    return train_step(engine, batch, stage="sft", settings=None, reference=None,
                      generators=None, zero_stage=zero_stage, precision="fp32", drill=drill)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_step_outcomes_and_what_each_leaves_of_the_weights(process_group, zero_stage):
    engine = _engine(zero_stage)
    drill = FaultDrill(FaultsSection(inject_nonfinite_batches=[2],
                                     inject_nonfinite_grad_batches=[3],
                                     inject_nonfinite_logits_batches=[4]), rank=0)
    before = _weights(engine)
    result = _step(engine, _batch(), zero_stage, drill)
    assert result.outcome is StepOutcome.OK and not result.outcome.is_fault
    assert math.isfinite(result.logs["loss/total"])
    after_ok = _weights(engine)
    assert not torch.equal(before, after_ok)  # the optimiser step was applied

    # an empty batch is not run forward at all (and not counted by the drills)
    assert _step(engine, _batch(0), zero_stage, drill).outcome is StepOutcome.EMPTY_BATCH
    assert drill.batches_seen == 1
    expected = [StepOutcome.NONFINITE_LOSS,  # batch 2: NaN loss
                StepOutcome.NONFINITE_GRADIENTS,  # batch 3: finite loss, NaN gradients
                StepOutcome.NONFINITE_LOSS]  # batch 4: NaN logits inside the forward
    for outcome in expected:
        result = _step(engine, _batch(), zero_stage, drill)
        assert result.outcome is outcome and result.outcome.is_fault
        assert torch.equal(_weights(engine), after_ok)  # nothing applied
    assert drill.batches_seen == 4
    assert _step(engine, _batch(), zero_stage, drill).outcome is StepOutcome.OK  # recovers
    assert torch.isfinite(_weights(engine)).all()


def test_drills_fire_on_rank_zero_only():
    drill = FaultDrill(FaultsSection(inject_nonfinite_batches=[1]), rank=1)
    assert torch.isfinite(drill.after_forward(torch.tensor(1.0)))
    drill = FaultDrill(FaultsSection(inject_nonfinite_batches=[1]), rank=0)
    assert torch.isnan(drill.after_forward(torch.tensor(1.0)))


def test_a_streak_of_non_finite_steps_stops_the_run_naming_the_last_checkpoint():
    streak = NonFiniteStreak(limit=3)
    for _ in range(2):
        streak.bad()
        streak.check(step=10, saved_step=8)
    streak.good()  # a good step ends the streak
    assert [streak.bad() for _ in range(2)] == [1, 2]
    streak.check(step=12, saved_step=8)
    assert streak.bad() == 3
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive .* after step 12 .*"
                                                 r"max_consecutive_nonfinite=3.*step 8"):
        streak.check(step=12, saved_step=8)


def test_step_timer_splits_waiting_from_computing():
    import time

    def slow_batches():
        for i in range(3):
            time.sleep(0.05 if i == 0 else 0.01)  # the epoch's first batch waits longest
            yield i

    timer = StepTimer()
    for _ in timer.timed(slow_batches()):
        time.sleep(0.02)  # "compute"
        metrics = timer.step_metrics(images=4)
    assert metrics["train/epoch_start_wait_seconds"] >= 0.05
    assert 0.0 < metrics["train/data_wait_fraction_steady"] < metrics["train/data_wait_fraction"]
    assert metrics["train/compute_seconds"] >= 0.02
    assert metrics["train/samples_per_s"] == pytest.approx(4 / metrics["train/step_seconds"])


@pytest.mark.parametrize("before", [None, "0"])
def test_compile_decorators_are_plain_while_deepspeed_initializes(monkeypatch, before):
    """``build_engine`` wraps ``deepspeed.initialize`` in ``_no_compile_decorators``: the
    ``torch.compile`` decorators of DeepSpeed's Muon module (imported by its ZeRO optimizer check)
    return the function itself instead of importing torch's inductor; the environment is put
    back afterwards."""
    import os

    from dinor1.train.engine import _no_compile_decorators

    if before is None:
        monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TORCHDYNAMO_DISABLE", before)

    def plain(x):
        return x + 1

    with _no_compile_decorators():
        assert torch.compile(plain) is plain
    assert os.environ.get("TORCHDYNAMO_DISABLE") == before
