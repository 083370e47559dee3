"""One training step on one worker: forward (model + objective), backward, optimiser step,
with the guards that skip a bad step on every worker together.

:func:`train_step` returns what happened as a :class:`StepOutcome`; the loop
(``train/loop.py``) counts, logs and reports it. A step that is not ``OK`` changed no weight.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from dinor1.model.randomness import StepGenerators
from dinor1.model.wrapped import unwrap
from dinor1.train.guards import FaultDrill, all_finite, any_empty, gradients_finite


class StepOutcome(enum.Enum):
    OK = "ok"
    EMPTY_BATCH = "empty_batch"  # some worker had no usable image: every worker skipped it
    NONFINITE_LOSS = "nonfinite_loss"  # NaN/inf loss on some worker: no backward anywhere
    NONFINITE_GRADIENTS = "nonfinite_gradients"  # finite loss, NaN/inf gradients: no update
    OVERFLOW = "overflow"  # fp16 loss scaling skipped the update and lowered the scale

    @property
    def is_fault(self) -> bool:
        """A non-finite step (counted toward ``faults.max_consecutive_nonfinite``)."""
        return self in (StepOutcome.NONFINITE_LOSS, StepOutcome.NONFINITE_GRADIENTS)


@dataclass
class StepResult:
    outcome: StepOutcome
    logs: dict[str, float] = field(default_factory=dict)  # the objective's named terms


def train_step(engine, batch: dict, *, stage: str, settings, reference,
               generators: StepGenerators, zero_stage: int, precision: str,
               drill: FaultDrill) -> StepResult:
    """Forward, backward and optimiser step of ``engine`` (a DeepSpeed engine around
    ``TrainingObjective``) on ``batch``, unless a guard skips it on every worker.

    Args:
        stage: ``"sft"`` or ``"grqo"``; ``reference``: the frozen reference (GRQO) or None.
        settings: the objective's :class:`~dinor1.objectives.step.ObjectiveSettings`.
        generators: the step's host and device generators (``model/randomness.py``).
        zero_stage, precision: ``deepspeed.zero_stage`` / ``deepspeed.precision``.
        drill: rehearsed faults (``faults.inject_*``).
    """
    if any_empty(batch):  # collective: all workers skip together
        return StepResult(StepOutcome.EMPTY_BATCH)
    with drill.forward(unwrap(engine)):
        loss, logs = engine(batch, stage=stage, settings=settings, reference=reference,
                            generators=generators)
    loss = drill.after_forward(loss)
    if not all_finite(loss):  # collective
        return StepResult(StepOutcome.NONFINITE_LOSS, logs)
    engine.backward(loss)
    # (between gradient-accumulation boundaries nothing is applied or checked: a non-finite
    # gradient stays in the sum and is caught at the boundary)
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary and not gradients_finite(engine, zero_stage):  # ZeRO-0: dropped, no update
        applied = False
    else:
        engine.step()  # ZeRO-1/2/3 skip a step with non-finite gradients themselves
        applied = not boundary or engine.was_step_applied()
    if applied:
        return StepResult(StepOutcome.OK, logs)
    if precision == "fp16":  # loss scaling: an overflow skips the step (routine)
        return StepResult(StepOutcome.OVERFLOW, logs)
    return StepResult(StepOutcome.NONFINITE_GRADIENTS, logs)


def step_seeded(seed: int, rank: int, step: int, device: torch.device) -> StepGenerators:
    """Seed everything a step draws from (seed, rank, step): the host and device generators,
    and torch's global generator (dropout and anything else that uses it)."""
    from dinor1.model.randomness import step_generators, step_seed

    generators = step_generators(step_seed(seed, rank, step), device)
    torch.manual_seed(step_seed(seed, rank, step))
    return generators
