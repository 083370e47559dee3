"""Every job YAML is a valid instance of the config schema."""

from pathlib import Path

import pytest

from dinor1.config import load_train_config

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_job_yaml_validates(job):
    cfg = load_train_config(job)
    assert cfg.stages.sft_epochs + cfg.stages.grqo_epochs > 0


def test_paper_recipes():
    names = {j.name for j in JOBS}
    assert {"demo.yaml", "sft.yaml", "grqo.yaml"} <= names
    grqo = load_train_config(Path(JOBS[0]).parent / "grqo.yaml")
    sft = load_train_config(Path(JOBS[0]).parent / "sft.yaml")
    assert (grqo.stages.sft_epochs, grqo.stages.grqo_epochs) == (1, 5)
    assert sft.stages.sft_epochs == 6 and sft.stages.grqo_epochs == 0
    assert grqo.model.init == sft.model.init == "swin-t"


@pytest.mark.parametrize("bf16_reduce", [False, True])
def test_bf16_gradient_reduce_is_a_decision_of_the_config(bf16_reduce):
    """deepspeed.precision=bf16 trains under torch.autocast; by default (ours) every gradient is
    reduced across workers in fp32. DeepSpeed's own default marks Linear/Conv weights to be
    reduced in bf16 (``comm_dtype``): checked with DeepSpeed's own parser and marking code."""
    import types

    import torch
    from deepspeed.runtime.config import get_lower_precision_safe_modules
    from deepspeed.runtime.torch_autocast import PARAM_COMM_DTYPE_ATTR_NAME, init_autocast_params

    from dinor1.train.optim import deepspeed_config

    cfg = load_train_config(Path(__file__).parents[2] / "jobs" / "demo.yaml", [
        "deepspeed.precision=bf16", f"deepspeed.bf16_gradient_reduce={str(bf16_reduce).lower()}"])
    modules = get_lower_precision_safe_modules(deepspeed_config(cfg))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    engine = types.SimpleNamespace(module=model, zero_quantized_weights=lambda: False)
    init_autocast_params(engine, torch.bfloat16, modules)
    marked = {name for name, p in model.named_parameters()
              if getattr(p, PARAM_COMM_DTYPE_ATTR_NAME, None) == torch.bfloat16}
    assert marked == ({"0.weight", "0.bias"} if bf16_reduce else set())


@pytest.mark.parametrize("overrides, message", [
    (["grqo.num_mute=50"], "grqo.num_mute mutes 50 of the model's 50 queries"),
    (["grqo.num_mute=null", "grqo.mute_fraction=0"], "grqo.mute_fraction mutes no query"),
    (["grqo.alpha=0"], "grqo.alpha=0 turns the advantage term off"),
])
def test_grqo_settings_with_an_identically_zero_advantage_are_refused(overrides, message):
    """tiny-cpu has 50 queries: the old default (300 muted) silently made GRQO KL-only."""
    from dinor1.errors import UserError

    with pytest.raises(UserError, match=message):
        load_train_config(JOBS[0].parent / "demo.yaml", overrides)
    # SFT-only runs are not GRQO runs: nothing to refuse
    load_train_config(JOBS[0].parent / "demo.yaml", [*overrides, "stages.grqo_epochs=0"])


def test_grqo_mutes_a_third_of_the_queries_by_default():
    cfg = load_train_config(JOBS[0].parent / "demo.yaml", ["grqo.num_mute=null"])
    assert cfg.grqo.muted_queries(50) == 17 and cfg.grqo.muted_queries(900) == 300
    grqo = load_train_config(JOBS[0].parent / "grqo.yaml")
    assert grqo.grqo.muted_queries(900) == 300
    pg = load_train_config(JOBS[0].parent / "demo.yaml", ["grqo.num_mute=0",
                                                           "grqo.form=policy_gradient"])
    assert pg.grqo.muted_queries(50) == 0  # the policy-gradient form needs no mute
