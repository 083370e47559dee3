"""Evaluate what a job's ``eval`` section asks for: one shard set
(:func:`dinor1.eval.evaluate.evaluate`) or, with ``eval.scorer=odinw``, every dataset of a
converted ODinW tree (:func:`dinor1.eval.odinw.evaluate_odinw`).

The choice is made here, above both, so that :mod:`dinor1.eval.odinw` uses
:mod:`dinor1.eval.evaluate` and never the other way round.
"""

from __future__ import annotations

from dinor1.config import TrainConfig
from dinor1.eval.evaluate import EvalOutcome, evaluate
from dinor1.eval.odinw import evaluate_odinw


def evaluate_job(cfg: TrainConfig, *, log_mlflow: bool = True) -> EvalOutcome:
    """``dinor1 eval``: the job's evaluation, logged to a new MLflow run unless ``log_mlflow``
    is false."""
    if cfg.eval.scorer == "odinw":
        return evaluate_odinw(cfg, log_mlflow=log_mlflow)
    return evaluate(cfg, log_mlflow=log_mlflow)
