"""The visual-text contrastive loss in `dinor1 train`: class names -> frozen text embeddings,
the learnable temperature inside the training module, and when a run uses the loss."""

import pytest
import torch

from dinor1.config import load_train_config
from dinor1.errors import UserError
from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.model.text import class_text_embeddings, load_tokenizer
from dinor1.objectives.step import TrainingObjective
from dinor1.train.launch import contrastive_class_names
from tests.helpers import tiny_step_batch

NAMES = {4: "red circle", 9: "blue square", 11: "green triangle"}
JOB = "jobs/demo.yaml"


def _text(model):
    tokenizer = load_tokenizer(None, model.config.text_config.vocab_size, list(NAMES.values()))
    return class_text_embeddings(model.eval(), tokenizer, NAMES)


def test_class_names_become_one_embedding_each(device):
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).to(device)
    text = _text(model)
    assert sorted(text) == [4, 9, 11]
    assert all(v.shape == (model.config.d_model,) and v.device.type == device.type
               and not v.requires_grad for v in text.values())
    assert not torch.allclose(text[4], text[9])
    torch.testing.assert_close(_text(model)[11], text[11])  # the same name, the same vector


def test_the_training_module_adds_the_term_and_trains_the_temperature(device):
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).to(device)
    objective = TrainingObjective(model.train(), _text(model)).to(device)
    assert [n for n, _ in objective.named_parameters() if not n.startswith("net.")] == [
        "contrastive.log_scale"]
    loss, logs = objective(tiny_step_batch(device), stage="sft")
    loss.backward()
    assert "loss/contrastive" in logs and objective.contrastive.log_scale.grad is not None
    _, plain = TrainingObjective(model)(tiny_step_batch(device), stage="sft")
    assert "loss/contrastive" not in plain


@pytest.mark.parametrize("init, mode, names, expected", [
    ("tiny-cpu", "auto", {"1": "cat"}, None),  # a random-init text encoder: off
    ("tiny-cpu", "true", {"1": "cat"}, {"1": "cat"}),
    ("tiny-cpu", "false", {"1": "cat"}, None),
    ("/models/grounding-dino-tiny", "auto", {"1": "cat"}, {"1": "cat"}),
    ("/models/grounding-dino-tiny", "auto", {}, None),  # no class names: nothing to contrast
])
def test_when_a_run_uses_the_loss(init, mode, names, expected):
    cfg = load_train_config(JOB, [f"objectives.contrastive={mode}"])
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init": init})})
    assert contrastive_class_names(cfg, {"categories": names}) == expected


def test_true_without_class_names_is_a_one_line_error():
    cfg = load_train_config(JOB, ["objectives.contrastive=true"])
    with pytest.raises(UserError, match="objectives.contrastive=true needs class names"):
        contrastive_class_names(cfg, None)
