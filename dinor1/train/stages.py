"""The paper's stage schedule, "1+5": SFT epochs, then GRQO epochs against a frozen reference.

:class:`StageSchedule` names each epoch's stage. :class:`GRQOReference` owns the reference
model of GRQO's KL term (``objectives/reference.py``): created from the policy when the first
GRQO epoch starts, refreshed per ``grqo.ref_refresh`` (each new epoch, every N steps, or never),
saved with each checkpoint and restored from it.
"""

from __future__ import annotations

from pathlib import Path

from dinor1.config import TrainConfig
from dinor1.objectives.reference import ReferenceModel


class StageSchedule:
    """``stages.sft_epochs`` x "sft" then ``stages.grqo_epochs`` x "grqo"."""

    def __init__(self, cfg: TrainConfig):
        self.stages = ["sft"] * cfg.stages.sft_epochs + ["grqo"] * cfg.stages.grqo_epochs

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, epoch: int) -> str:
        return self.stages[epoch]


class GRQOReference:
    """The frozen reference policy, from the first GRQO epoch on (None before)."""

    def __init__(self, refresh: str):
        self.refresh_spec = refresh
        self.model: ReferenceModel | None = None

    def restore(self, engine, weights: Path, refresh_step: int | None) -> None:
        """The reference a checkpoint saved (its weights and when it was last refreshed)."""
        from dinor1.model.dino_r1 import load_weights

        self.model = ReferenceModel(engine, self.refresh_spec)
        load_weights(self.model.model, weights)
        self.model.last_refresh_step = refresh_step or 0

    def begin_epoch(self, engine, stage: str, step: int, resumed: bool) -> None:
        """At an epoch's start: create the reference when GRQO begins, else refresh it when
        the policy says so (not in the epoch a run resumes in: it was restored as saved)."""
        if stage != "grqo":
            return
        if self.model is None:
            self.model = ReferenceModel(engine, self.refresh_spec)
            self.model.last_refresh_step = step
        elif not resumed and self.model.should_refresh(step, new_epoch=True):
            self.model.refresh(engine, step)

    def before_step(self, engine, stage: str, step: int) -> None:
        """``grqo.ref_refresh: steps:N``: refresh every N steps."""
        ref = self.model
        if (ref is not None and stage == "grqo" and ref.kind == "steps"
                and ref.should_refresh(step, False)):
            ref.refresh(engine, step)

    def for_stage(self, stage: str) -> ReferenceModel | None:
        """What the objective gets: the reference in GRQO epochs, None in SFT ones."""
        return self.model if stage == "grqo" else None

    def stats(self, stage: str) -> dict[str, float]:
        return self.model.stats() if self.model is not None and stage == "grqo" else {}

    @property
    def refresh_step(self) -> int | None:
        return self.model.last_refresh_step if self.model is not None else None
