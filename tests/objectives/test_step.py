"""The combined training objective on a real (tiny) DINO-R1 and a real collated batch."""

import math

import pytest
import torch

from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.model.randomness import step_generators
from dinor1.objectives.contrastive import VisualTextContrastive
from dinor1.objectives.reference import ReferenceModel
from dinor1.objectives.settings import GRQOSettings
from dinor1.objectives.step import ObjectiveSettings, training_losses
from tests.helpers import tiny_step_batch

_batch = tiny_step_batch


def test_sft_terms_and_learning(device):
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        loss, logs = training_losses(model, _batch(device), stage="sft",
                                     generators=step_generators(step, device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    layers = model.config.decoder_layers
    for prefix in [f"dec{i}" for i in range(layers)] + ["enc"] + [f"dn{i}" for i in range(layers)]:
        for term in ("loss_class", "loss_bbox", "loss_giou"):
            assert f"loss/{prefix}/{term}" in logs
    assert "loss/grqo" not in logs and logs["data/num_prompts"] == 2.0
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns the batch


@pytest.mark.parametrize("form, score", [("release", "decoder"), ("policy_gradient", "decoder"),
                                         ("policy_gradient", "objectness")])
def test_grqo_stage_adds_the_term_and_diagnostics(device, form, score):
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).train().to(device)
    reference = ReferenceModel(model, refresh="epoch")
    settings = ObjectiveSettings(grqo=GRQOSettings(num_mute=10, form=form, pg_score=score))
    loss, logs = training_losses(model, _batch(device), stage="grqo", settings=settings,
                                 reference=reference, generators=step_generators(0, device))
    loss.backward()
    assert "loss/grqo" in logs and math.isfinite(logs["loss/grqo"])
    assert logs["grqo/muted_fraction"] == pytest.approx(10 / model.config.num_queries)
    assert logs["grqo/kl_mean"] >= 0
    with pytest.raises(ValueError, match="reference"):
        training_losses(model, _batch(), stage="grqo")


def test_contrastive_term_only_with_class_names():
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).train()
    d = model.config.d_model
    class_text = {4: torch.randn(d), 9: torch.randn(d)}
    contrast = VisualTextContrastive()
    loss, logs = training_losses(model, _batch(), class_text=class_text, contrastive=contrast)
    loss.backward()
    assert "loss/contrastive" in logs and contrast.log_scale.grad is not None
    _, logs = training_losses(model, _batch())
    assert "loss/contrastive" not in logs


def test_grqo_refuses_to_mute_every_query():
    grqo = ObjectiveSettings().grqo
    assert grqo.muted_queries(900) == 300  # a third, as the release's 300 of 900
    assert grqo.muted_queries(50) == 17
    assert GRQOSettings(num_mute=10).muted_queries(50) == 10
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).train()
    queries = model.config.num_queries
    settings = ObjectiveSettings(grqo=GRQOSettings(num_mute=queries))
    with pytest.raises(ValueError, match=f"mutes {queries} of {queries} queries"):
        training_losses(model, _batch(), stage="grqo", settings=settings,
                        reference=ReferenceModel(model))
