"""`dinor1 eval` picks one shard set or an ODinW tree in dinor1.eval.job, above both
dinor1.eval.evaluate and dinor1.eval.odinw (which uses evaluate, never the reverse)."""

from pathlib import Path

import pytest

from dinor1.config import load_train_config
from dinor1.errors import UserError

JOB = Path(__file__).parents[2] / "jobs" / "demo.yaml"


def _cfg(*overrides):
    return load_train_config(JOB, ["data.val_shards=null", *overrides],
                             require_train_shards=False)


def test_evaluate_job_dispatches_on_the_scorer(monkeypatch):
    from dinor1.eval import job

    calls = []
    monkeypatch.setattr(job, "evaluate", lambda cfg, log_mlflow: calls.append(("one", log_mlflow)))
    monkeypatch.setattr(job, "evaluate_odinw",
                        lambda cfg, log_mlflow: calls.append(("odinw", log_mlflow)))
    job.evaluate_job(_cfg("eval.shards=x", "eval.scorer=odinw"), log_mlflow=False)
    for scorer in ("auto", "coco", "lvis"):
        job.evaluate_job(_cfg("eval.shards=x", f"eval.scorer={scorer}"))
    assert calls == [("odinw", False), ("one", True), ("one", True), ("one", True)]


@pytest.mark.parametrize("overrides, message", [
    ((), "config key 'eval.shards' (or 'data.val_shards') is required"),
    (("data.val_shards=v",), "eval.scorer odinw needs eval.shards (the converted ODinW root)"),
])
def test_odinw_needs_its_shard_root(overrides, message):
    """The same errors as when evaluate() dispatched to ODinW itself."""
    from dinor1.eval.job import evaluate_job

    with pytest.raises(UserError) as info:
        evaluate_job(_cfg("eval.scorer=odinw", *overrides))
    assert str(info.value) == message


def test_evaluate_refuses_an_odinw_tree():
    """evaluate() scores one shard set; an ODinW job is pointed at evaluate_job."""
    from dinor1.eval.evaluate import evaluate

    with pytest.raises(UserError, match="dinor1.eval.job.evaluate_job"):
        evaluate(_cfg("eval.scorer=odinw", "eval.shards=x"))
