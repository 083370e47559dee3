"""The trainer state a checkpoint restores, beside DeepSpeed's own files.

Every step is deterministic given (seed, rank, step) (``model/randomness.py``), so the state
holds no random-generator state: where training stands, the counters of skipped steps, the data
quality totals and when the reference was last refreshed. It is written as versioned JSON
(``trainer_state.json``, ``train/checkpoints.py``); a checkpoint from before the version field
(version 0, the same keys) still loads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

STATE_VERSION = 1


@dataclass
class TrainState:
    """Where a run stands. ``step`` counts optimiser steps taken (skipped steps do not count).

    Attributes:
        step: optimiser steps so far.
        epoch: the epoch being trained (== the number of epochs at the end of training).
        steps_in_epoch: steps of ``epoch`` already taken (a mid-epoch checkpoint resumes there).
        saved_step: the step of the newest checkpoint this run wrote.
        nonfinite_steps: steps skipped for a NaN/inf loss or gradients (the two below summed).
        empty_batches: batches skipped because some worker drew only corrupt samples.
        overflow_steps: fp16 steps skipped by loss scaling (routine, not a fault).
        data_quality: ``QualityCounter.state_dict()`` summed over all ranks.
        reference_refresh_step: when the GRQO reference was last copied from the policy (None
            before GRQO starts).
        mlflow_run_id, world_size, zero_stage: how the checkpoint was written (read by
            ``checkpoints.checkpoint_problem`` and by people).
    """

    step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0
    saved_step: int = 0
    nonfinite_steps: int = 0
    nonfinite_loss_steps: int = 0
    nonfinite_grad_steps: int = 0
    empty_batches: int = 0
    overflow_steps: int = 0
    data_quality: dict[str, Any] = field(default_factory=dict)
    reference_refresh_step: int | None = None
    mlflow_run_id: str | None = None
    world_size: int = 1
    zero_stage: int = 0
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str = "trainer_state.json") -> TrainState:
        """Parse a saved state; an unknown key or a newer version is an error naming ``source``.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{source}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.setdefault("version", 0)  # written before the version field existed
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(f"{source}: trainer state version {version!r} is newer than this "
                             f"dinor1 reads ({STATE_VERSION}); upgrade dinor1")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown trainer state keys {unknown}")
        data["version"] = STATE_VERSION
        return cls(**data)
