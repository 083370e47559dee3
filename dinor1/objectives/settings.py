"""The training objective's settings, and the only copy of their defaults.

Plain frozen dataclasses (no pydantic: the objective runs on a bare PyTorch machine, e.g.
``dinor1.bench.objective_steps``) whose field names are keys of the config sections
``objectives`` and ``grqo``. The config schema (:mod:`dinor1.config`) takes its defaults for
those keys from these classes and adds their validation; the loss and matching functions take
every weight as a required argument. :func:`objective_settings` builds them from a job's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from dinor1.config import TrainConfig


@dataclass(frozen=True)
class LossSettings:
    """The step's keys of config section ``objectives`` (their comments: the schema)."""

    class_weight: float = 1.0  # detection loss: focal term
    bbox_weight: float = 5.0  # detection loss: L1 term
    giou_weight: float = 2.0  # detection loss: 1 - GIoU term
    match_class_weight: float = 2.0  # matching cost: focal term
    match_bbox_weight: float = 5.0  # matching cost: L1 term
    match_giou_weight: float = 2.0  # matching cost: -GIoU term
    focal_alpha: float = 0.25  # focal loss and focal matching cost
    focal_gamma: float = 2.0
    denoising: bool = True
    encoder_loss: bool = True
    contrastive_weight: float = 100.0  # the release's

    def loss_weights(self) -> dict[str, float]:
        """The keyword weights of ``detection_loss``."""
        return dict(class_weight=self.class_weight, bbox_weight=self.bbox_weight,
                    giou_weight=self.giou_weight, alpha=self.focal_alpha, gamma=self.focal_gamma)

    def matching_weights(self) -> dict[str, float]:
        """The keyword weights of ``matching_cost`` and ``best_match_cost``."""
        return dict(class_weight=self.match_class_weight, bbox_weight=self.match_bbox_weight,
                    giou_weight=self.match_giou_weight, alpha=self.focal_alpha,
                    gamma=self.focal_gamma)


@dataclass(frozen=True)
class GRQOSettings:
    """The step's keys of config section ``grqo`` (their comments: the schema)."""

    form: str = "release"  # or "policy_gradient"
    alpha: float = 0.01  # the advantage term's weight
    beta: float = 0.04  # the KL term's weight
    pg_score: str = "decoder"  # policy_gradient form: "decoder" or "objectness"
    mute_fraction: float = 1 / 3  # of the queries (the release: 300 of 900)
    num_mute: int | None = None  # an absolute count instead of the fraction

    def muted_queries(self, num_queries: int) -> int:
        """How many of ``num_queries`` queries per group are muted."""
        if self.num_mute is not None:
            return self.num_mute
        return round(self.mute_fraction * num_queries)


@dataclass(frozen=True)
class ObjectiveSettings:
    """Everything the training objective reads from a job's config."""

    objectives: LossSettings = field(default_factory=LossSettings)
    grqo: GRQOSettings = field(default_factory=GRQOSettings)
    exemplars_per_class: int = 1  # config prompts.exemplars_per_class


S = TypeVar("S")


def from_section(settings: type[S], section) -> S:
    """``settings`` (one of the dataclasses above) with the values of a config section's keys of
    the same names."""
    return settings(**{f.name: getattr(section, f.name) for f in fields(settings)})


def objective_settings(cfg: TrainConfig, num_queries: int) -> ObjectiveSettings:
    """The objective's settings for a job whose model has ``num_queries`` queries.

    With GRQO epochs, refuses (ValueError naming the key) a GRQO setting whose advantage term
    would be identically 0 for that query count: a checkpoint's count is known only once it is
    loaded, so the config's own check may not have run.
    """
    if cfg.stages.grqo_epochs > 0:
        cfg.grqo.check_advantage(num_queries)
    return ObjectiveSettings(objectives=from_section(LossSettings, cfg.objectives),
                             grqo=from_section(GRQOSettings, cfg.grqo),
                             exemplars_per_class=cfg.prompts.exemplars_per_class)
