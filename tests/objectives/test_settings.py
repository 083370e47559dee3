"""The objective's settings: every weight is a config key whose value reaches the computation."""

import dataclasses
import math

import pytest
import torch

from dinor1.config import GRQOConfig, ObjectivesConfig, load_train_config
from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.model.randomness import step_generators
from dinor1.objectives import step as step_module
from dinor1.objectives.detection import detection_loss
from dinor1.objectives.matcher import matching_cost
from dinor1.objectives.reference import ReferenceModel
from dinor1.objectives.settings import GRQOSettings, LossSettings
from dinor1.objectives.step import ObjectiveSettings, objective_settings, training_losses
from tests.helpers import tiny_step_batch

# every weight of the objective, each set to a value of its own (none is its default)
OBJECTIVE_OVERRIDES = {"class_weight": 1.5, "bbox_weight": 4.5, "giou_weight": 2.5,
                       "match_class_weight": 7.0, "match_bbox_weight": 3.0,
                       "match_giou_weight": 0.5, "focal_alpha": 0.4, "focal_gamma": 1.5,
                       "contrastive_weight": 30.0}
GRQO_OVERRIDES = {"alpha": 0.2, "beta": 0.3, "mute_fraction": 0.2, "num_mute": 5}
LOSS_KW = dict(class_weight=1.5, bbox_weight=4.5, giou_weight=2.5, alpha=0.4, gamma=1.5)
COST_KW = dict(class_weight=7.0, bbox_weight=3.0, giou_weight=0.5, alpha=0.4, gamma=1.5)


def _config(*overrides: str):
    # a model.init whose query count is unknown to the config: the builder checks GRQO's mute
    return load_train_config(None, ["model.init=some/checkpoint", *overrides],
                             require_train_shards=False)


def _numeric_fields(model) -> set[str]:
    return {name for name, f in model.model_fields.items() if f.annotation in (float, int | None)}


def test_the_overrides_cover_every_numeric_setting():
    # a new weight in the schema must be added to this file's routing test
    assert _numeric_fields(ObjectivesConfig) == set(OBJECTIVE_OVERRIDES)
    assert _numeric_fields(GRQOConfig) == set(GRQO_OVERRIDES)
    defaults_obj, defaults_grqo = ObjectivesConfig(), GRQOConfig()
    assert all(getattr(defaults_obj, k) != v for k, v in OBJECTIVE_OVERRIDES.items())
    assert all(getattr(defaults_grqo, k) != v for k, v in GRQO_OVERRIDES.items())


@pytest.mark.parametrize("settings, section", [(LossSettings, ObjectivesConfig),
                                               (GRQOSettings, GRQOConfig)])
def test_the_schema_takes_every_default_from_the_settings(settings, section):
    names = [f.name for f in dataclasses.fields(settings)]
    assert set(names) <= set(section.model_fields)  # every setting is a config key
    assert section().model_dump(include=set(names)) == dataclasses.asdict(settings())
    # and every numeric key of the section is a setting of the objective
    assert _numeric_fields(section) <= set(names)


def test_default_settings_are_the_releases():
    s = ObjectiveSettings()
    assert s.objectives == LossSettings() and s.grqo == GRQOSettings()
    assert s.exemplars_per_class == 1
    assert s.objectives.loss_weights() == dict(class_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                                               alpha=0.25, gamma=2.0)
    assert s.objectives.matching_weights() == dict(class_weight=2.0, bbox_weight=5.0,
                                                   giou_weight=2.0, alpha=0.25, gamma=2.0)
    assert (s.grqo.form, s.grqo.alpha, s.grqo.beta) == ("release", 0.01, 0.04)
    assert s.grqo.muted_queries(900) == 300 and s.objectives.contrastive_weight == 100.0


def test_builder_copies_the_sections_and_checks_grqo_only_with_grqo_epochs():
    cfg = _config("objectives.match_class_weight=7", "prompts.exemplars_per_class=3",
                  "grqo.num_mute=10")
    settings = objective_settings(cfg, 50)
    assert settings.objectives.match_class_weight == 7.0
    assert settings.exemplars_per_class == 3 and settings.grqo.muted_queries(50) == 10
    cfg.objectives.match_class_weight = 1.0  # a later edit of the config
    assert settings.objectives.match_class_weight == 7.0
    with pytest.raises(ValueError, match="grqo.num_mute mutes 50 of the model's 50 queries"):
        objective_settings(_config("grqo.num_mute=50"), 50)
    with pytest.raises(ValueError, match="grqo.mute_fraction"):
        objective_settings(_config("grqo.mute_fraction=0", "grqo.form=release"), 50)
    sft_only = _config("grqo.num_mute=50", "stages.grqo_epochs=0")
    assert objective_settings(sft_only, 50).grqo.num_mute == 50  # GRQO never runs


def _one_image():
    """Query 1 against GT 0 (prompt 1): p = 0.25, L1 = 0.4, GIoU = 0.25 (nested box)."""
    logits = torch.tensor([[[-math.inf, 0.0], [-math.inf, math.log(1 / 3)]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.2, 0.2]]])
    return logits, boxes, torch.tensor([[1]]), torch.tensor([[[0.5, 0.5, 0.4, 0.4]]])


def _cost_by_hand(wc, wb, wg, alpha, gamma, p=0.25, l1=0.4, giou=0.25):
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    return wc * (pos - neg) + wb * l1 - wg * giou


@pytest.mark.parametrize("key, value, weights", [
    ("match_class_weight", 7, (7, 5, 2, 0.25, 2)),
    ("match_bbox_weight", 3, (2, 3, 2, 0.25, 2)),
    ("match_giou_weight", 0.5, (2, 5, 0.5, 0.25, 2)),
    ("focal_alpha", 0.6, (2, 5, 2, 0.6, 2)),
    ("focal_gamma", 1, (2, 5, 2, 0.25, 1)),
])
def test_a_matching_override_changes_the_cost_by_hand(key, value, weights):
    s = objective_settings(_config(f"objectives.{key}={value}"), 50)
    cost = matching_cost(*_one_image(), **s.objectives.matching_weights())
    expected = _cost_by_hand(*weights)
    assert cost[0, 1, 0].item() == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(_cost_by_hand(2, 5, 2, 0.25, 2), abs=1e-3)  # it can fail


@pytest.mark.parametrize("key, value, weights", [
    ("class_weight", 3, (3, 5, 2, 0.25, 2)),
    ("bbox_weight", 1, (1, 1, 2, 0.25, 2)),
    ("giou_weight", 0.5, (1, 5, 0.5, 0.25, 2)),
    ("focal_alpha", 0.6, (1, 5, 2, 0.6, 2)),
    ("focal_gamma", 1, (1, 5, 2, 0.25, 1)),
])
def test_a_loss_override_changes_the_detection_loss_by_hand(key, value, weights):
    wc, wb, wg, alpha, gamma = weights
    s = objective_settings(_config(f"objectives.{key}={value}"), 50)
    # all four valid logits 0 (p = 0.5): one positive, three negatives; the box is 0.1 off in x
    # (L1 0.1) and its GIoU with the GT is 1/3
    logits = torch.zeros(1, 2, 2)
    boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    out = detection_loss(logits, boxes, [(torch.tensor([0]), torch.tensor([0]))],
                         torch.tensor([[0]]), torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
                         torch.tensor([[True, True]]), 1.0, **s.objectives.loss_weights())
    focal = (alpha + 3 * (1 - alpha)) * 0.5**gamma * math.log(2)
    assert out["loss_class"].item() == pytest.approx(wc * focal, abs=1e-6)
    assert out["loss_bbox"].item() == pytest.approx(wb * 0.1, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(wg * 2 / 3, abs=1e-6)


def _record(monkeypatch, module, name: str, calls: list):
    real = getattr(module, name)

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)


def _weights(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("class_weight", "bbox_weight", "giou_weight", "alpha", "gamma")}


def test_every_weight_reaches_the_training_step(monkeypatch):
    """Each weight set through the config reaches the function that uses it, in stage grqo
    (the mute count as num_mute, and as a fraction of the queries without it)."""
    cfg = _config(*[f"objectives.{k}={v}" for k, v in OBJECTIVE_OVERRIDES.items()],
                  *[f"grqo.{k}={v}" for k, v in GRQO_OVERRIDES.items()],
                  "prompts.exemplars_per_class=2")
    names = ("matching_cost", "best_match_cost", "detection_loss", "grqo_loss",
             "assemble_training_prompts")
    calls = {name: [] for name in names}
    for name in names:
        _record(monkeypatch, step_module, name, calls[name])
    with_count = objective_settings(cfg, 50)
    by_fraction = dataclasses.replace(  # 0.2 of 50 queries
        with_count, grqo=dataclasses.replace(with_count.grqo, num_mute=None))
    for settings, muted in ((with_count, 5), (by_fraction, 10)):
        for recorded in calls.values():
            recorded.clear()
        torch.manual_seed(0)
        model = DinoR1(tiny_cpu()).train()
        d = model.config.d_model
        _, logs = training_losses(
            model, tiny_step_batch(), stage="grqo", settings=settings,
            reference=ReferenceModel(model), generators=step_generators(0),
            class_text={4: torch.randn(d), 9: torch.randn(d)},
            contrastive=lambda visual, text: torch.tensor(2.0))
        assert len(calls["matching_cost"]) == 2  # decoder layers, encoder proposals
        assert all(_weights(kw) == COST_KW for kw in calls["matching_cost"])
        assert [_weights(kw) for kw in calls["best_match_cost"]] == [COST_KW]
        assert len(calls["detection_loss"]) == 2 * model.config.decoder_layers + 1
        assert all(_weights(kw) == LOSS_KW for kw in calls["detection_loss"])
        (grqo,) = calls["grqo_loss"]
        assert (grqo["form"], grqo["alpha"], grqo["beta"], grqo["num_mute"]) == (
            "release", 0.2, 0.3, muted)
        assert calls["assemble_training_prompts"][0]["exemplars_per_class"] == 2
        assert logs["loss/contrastive"] == 30.0 * 2.0
        assert logs["grqo/muted_fraction"] == pytest.approx(muted / 50)


def test_a_yaml_focal_alpha_reaches_the_focal_loss(tmp_path, monkeypatch):
    from dinor1.objectives import detection

    job = tmp_path / "job.yaml"
    job.write_text("data:\n  train_shards: shards\nobjectives:\n  focal_alpha: 0.6\n")
    cfg = load_train_config(job)
    settings = objective_settings(cfg, tiny_cpu().num_queries)
    calls = []
    _record(monkeypatch, detection, "sigmoid_focal_loss", calls)
    torch.manual_seed(0)
    training_losses(DinoR1(tiny_cpu()).train(), tiny_step_batch(), settings=settings,
                    generators=step_generators(0))
    assert calls and all((kw["alpha"], kw["gamma"]) == (0.6, 2.0) for kw in calls)
    # and what it computes with it: a positive at logit 0, alpha * 0.5^2 * ln 2
    loss = detection.sigmoid_focal_loss(torch.zeros(1, 1, 1), torch.ones(1, 1, 1),
                                        torch.tensor([[True]]), alpha=cfg.objectives.focal_alpha,
                                        gamma=cfg.objectives.focal_gamma)
    assert loss.item() == pytest.approx(0.6 * 0.25 * math.log(2), abs=1e-7)
