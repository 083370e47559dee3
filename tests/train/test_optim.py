"""The optimiser pieces of ``train/optim.py`` without Ray: the learning-rate schedule, the AdamW
parameter groups of a real (tiny) model and the DeepSpeed config generated from ours."""

import pytest
import torch

from dinor1.config import load_train_config
from dinor1.train.optim import deepspeed_config, lr_factor, parameter_groups, set_lr

SWIN = "gdino.model.backbone.conv_encoder.model.swin."
BLOCK = SWIN + "encoder.layers.0.blocks.0."
TEXT = "gdino.model.text_backbone."


def _cfg(*overrides):
    return load_train_config(None, list(overrides), require_train_shards=False)


# --- learning-rate schedule ---------------------------------------------------------------

# warm-up 0.25 -> 1 over 8 steps; x0.5 from epoch 3 and again from epoch 5 (binary fractions:
# the expected values below are exact)
SCHEDULE = ("schedule.warmup_steps=8", "schedule.warmup_factor=0.25",
            "schedule.decay_epochs=[3, 5]", "schedule.gamma=0.5")


@pytest.mark.parametrize("step, expected", [
    (0, 0.25),          # warm-up starts at warmup_factor
    (1, 0.34375),       # 0.25 + 0.75 * 1/8
    (4, 0.625),         # half-way: 0.25 + 0.75 / 2
    (7, 0.90625),       # last warm-up step: 0.25 + 0.75 * 7/8
    (8, 1.0),           # warm-up over
    (1000, 1.0),
])
def test_warmup_is_linear_from_warmup_factor_to_one(step, expected):
    assert lr_factor(step, 0, _cfg(*SCHEDULE)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("epoch, expected", [
    (0, 1.0), (2, 1.0),     # before the first decay epoch
    (3, 0.5), (4, 0.5),     # from the first decay epoch
    (5, 0.25), (40, 0.25),  # from the second: gamma twice
])
def test_step_decay_by_gamma_at_each_decay_epoch(epoch, expected):
    assert lr_factor(10_000, epoch, _cfg(*SCHEDULE)) == pytest.approx(expected, rel=1e-12)


def test_warmup_and_decay_multiply():
    """A decay epoch reached during warm-up scales the warm-up ramp."""
    assert lr_factor(4, 3, _cfg(*SCHEDULE)) == pytest.approx(0.625 * 0.5, rel=1e-12)


def test_unsorted_decay_epochs_decay_the_same():
    cfg = _cfg(*SCHEDULE, "schedule.decay_epochs=[5, 3]")
    assert [lr_factor(100, e, cfg) for e in (2, 3, 5)] == pytest.approx([1.0, 0.5, 0.25])


def test_no_warmup_starts_at_full_lr():
    cfg = _cfg("schedule.warmup_steps=0", "schedule.decay_epochs=[1]", "schedule.gamma=0.1")
    assert lr_factor(0, 0, cfg) == 1.0
    assert lr_factor(0, 1, cfg) == pytest.approx(0.1)


def test_default_schedule_follows_the_recipe():
    """Defaults: warm-up 0.1 -> 1 over 1000 steps, x0.1 at epochs 8 and 11."""
    cfg = _cfg()
    assert lr_factor(0, 0, cfg) == pytest.approx(0.1)
    assert lr_factor(500, 0, cfg) == pytest.approx(0.55)
    assert lr_factor(1000, 7, cfg) == 1.0
    assert lr_factor(1000, 8, cfg) == pytest.approx(0.1)
    assert lr_factor(1000, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(1000, 11, cfg) == pytest.approx(0.01)


def test_set_lr_scales_each_groups_base_lr_without_compounding():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0, "weight_decay": 0.3},
                                   {"params": [params[1]], "lr": 1.0}], lr=1.0)
    base_lrs = [4e-4, 4e-5]
    set_lr(optimizer, base_lrs, 0.5)
    set_lr(optimizer, base_lrs, 0.5)  # from the base lrs, not from the current ones
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 2e-5], rel=1e-12)
    assert optimizer.param_groups[0]["weight_decay"] == 0.3  # only lr changes
    set_lr(optimizer, base_lrs, 1.0)
    assert [g["lr"] for g in optimizer.param_groups] == base_lrs


# --- parameter groups ---------------------------------------------------------------------

OPTIMIZER = ("optimizer.lr=2e-4", "optimizer.backbone_lr_mult=0.25",
             "optimizer.weight_decay=0.05")


@pytest.fixture(scope="module")
def model():
    from dinor1.model.dino_r1 import DinoR1

    torch.manual_seed(0)
    return DinoR1.from_pretrained("tiny-cpu")


def _groups(model, freeze_text_encoder: bool):
    """parameter_groups after freezing the text encoder as ``model.freeze_text_encoder`` does
    (``train/engine.py``: ``text_backbone.requires_grad_(False)``), or unfreezing it."""
    model.gdino.model.text_backbone.requires_grad_(not freeze_text_encoder)
    cfg = _cfg(*OPTIMIZER, f"model.freeze_text_encoder={str(freeze_text_encoder).lower()}")
    return parameter_groups(model, cfg)


def _group_of(model, groups) -> dict[str, str]:
    """{parameter name: name of the group holding it}; names in no group are absent."""
    where = {id(p): g["name"] for g in groups for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


@pytest.mark.parametrize("freeze", [True, False])
def test_groups_hold_each_trainable_parameter_once(model, freeze):
    groups = _groups(model, freeze)
    held = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(held) == len({id(p) for p in held})  # tied weights (bbox heads) appear once
    assert {id(p) for p in held} == {id(p) for p in trainable}
    torch.optim.AdamW(groups)  # refuses a parameter in two groups


def test_group_lrs_and_weight_decay(model):
    groups = {g["name"]: g for g in _groups(model, True)}
    assert list(groups) == ["head", "head_no_decay", "backbone", "backbone_no_decay"]
    lrs = {name: g["lr"] for name, g in groups.items()}
    assert lrs == pytest.approx({"head": 2e-4, "head_no_decay": 2e-4,
                                 "backbone": 5e-5, "backbone_no_decay": 5e-5}, rel=1e-12)
    decay = {name: g["weight_decay"] for name, g in groups.items()}
    assert decay == {"head": 0.05, "head_no_decay": 0.0, "backbone": 0.05,
                     "backbone_no_decay": 0.0}


@pytest.mark.parametrize("name, group", [
    # image backbone: weights decay at the backbone lr; norms, biases and the relative
    # position bias table do not decay
    (SWIN + "embeddings.patch_embeddings.projection.weight", "backbone"),
    (SWIN + "embeddings.patch_embeddings.projection.bias", "backbone_no_decay"),
    (BLOCK + "attention.q_proj.weight", "backbone"),
    (BLOCK + "layernorm_before.weight", "backbone_no_decay"),
    (BLOCK + "attention.relative_position_bias.relative_position_bias_table",
     "backbone_no_decay"),
    # the rest of the detector and the prompt encoder train at the full lr
    ("gdino.model.decoder.layers.0.self_attn.query.weight", "head"),
    ("gdino.model.decoder.layers.0.self_attn.query.bias", "head_no_decay"),
    ("gdino.model.decoder.layers.0.self_attn_layer_norm.weight", "head_no_decay"),
    ("gdino.model.encoder.layers.0.fusion_layer.vision_param", "head_no_decay"),  # 1-D
    ("gdino.model.level_embed", "head_no_decay"),  # 2-D embeddings, named
    ("gdino.model.query_position_embeddings.weight", "head_no_decay"),
    ("prompt_encoder.content.weight", "head_no_decay"),
    ("prompt_encoder.self_attn.in_proj_weight", "head"),
    ("prompt_classifier.bias", "head_no_decay"),
])
def test_parameter_lands_in_its_group(model, name, group):
    assert _group_of(model, _groups(model, True))[name] == group


def test_frozen_text_encoder_and_unused_norm_are_left_out(model):
    placed = _group_of(model, _groups(model, True))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith(TEXT) for n in names)
    assert not any(n.startswith(TEXT) for n in placed)
    assert SWIN + "layernorm.weight" in names  # Swin's final norm, frozen by DinoR1 itself
    assert SWIN + "layernorm.weight" not in placed


@pytest.mark.parametrize("name, group", [
    (TEXT + "embeddings.word_embeddings.weight", "backbone"),
    (TEXT + "embeddings.position_embeddings.weight", "backbone_no_decay"),
    (TEXT + "embeddings.LayerNorm.weight", "backbone_no_decay"),
])
def test_unfrozen_text_encoder_trains_at_the_backbone_lr(model, name, group):
    assert _group_of(model, _groups(model, False))[name] == group


@pytest.mark.parametrize("freeze", [True, False])
def test_every_vector_parameter_is_free_of_weight_decay(model, freeze):
    groups = _groups(model, freeze)
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.ndim >= 2 for p in decayed)


# --- DeepSpeed config ---------------------------------------------------------------------

def test_deepspeed_config_fp32_defaults():
    cfg = _cfg("data.batch_size=6", "deepspeed.gradient_accumulation_steps=3",
               "deepspeed.gradient_clipping=0.5")
    assert deepspeed_config(cfg) == {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@pytest.mark.parametrize("stage, expected", [
    (0, {"stage": 0, "overlap_comm": True, "reduce_bucket_size": 12_345_678}),
    (1, {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 12_345_678,
         "allgather_bucket_size": 12_345_678}),
    (2, {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 12_345_678,
         "allgather_bucket_size": 12_345_678}),
    # ZeRO-3 has no all-gather bucket: only its reduce bucket is sized
    (3, {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 12_345_678}),
])
def test_deepspeed_zero_section(stage, expected):
    cfg = _cfg(f"deepspeed.zero_stage={stage}", "deepspeed.bucket_elements=12345678",
               "deepspeed.overlap_comm=true")
    assert deepspeed_config(cfg)["zero_optimization"] == expected


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_section_without_buckets_keeps_deepspeeds_defaults(stage):
    cfg = _cfg(f"deepspeed.zero_stage={stage}")
    assert deepspeed_config(cfg)["zero_optimization"] == {"stage": stage, "overlap_comm": False}


@pytest.mark.parametrize("overrides, expected", [
    # bf16: fp32 weights, torch.autocast in the engine, every gradient reduced in fp32
    (["deepspeed.precision=bf16"],
     {"torch_autocast": {"enabled": True, "dtype": "bfloat16",
                         "lower_precision_safe_modules": []}}),
    # bf16_gradient_reduce: DeepSpeed's default list of modules reduced in bf16
    (["deepspeed.precision=bf16", "deepspeed.bf16_gradient_reduce=true"],
     {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}),
    (["deepspeed.precision=fp16", "scaling.use_gpu=true"], {"fp16": {"enabled": True}}),
    (["deepspeed.precision=fp32"], {}),
    (["deepspeed.precision=fp32", "deepspeed.bf16_gradient_reduce=true"], {}),
])
def test_deepspeed_precision_section(overrides, expected):
    out = deepspeed_config(_cfg(*overrides))
    precision = {k: out[k] for k in ("torch_autocast", "fp16", "bf16", "bfloat16") if k in out}
    assert precision == expected


@pytest.mark.parametrize("overrides", [
    ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"],
    ["deepspeed.zero_stage=1", "deepspeed.bucket_elements=1000000", "data.batch_size=3",
     "deepspeed.gradient_accumulation_steps=4", "deepspeed.overlap_comm=true"],
    ["deepspeed.zero_stage=3", "deepspeed.bucket_elements=2000000",
     "deepspeed.precision=bf16", "deepspeed.bf16_gradient_reduce=true"],
    ["deepspeed.precision=fp16", "scaling.use_gpu=true", "deepspeed.gradient_clipping=0"],
])
def test_deepspeed_reads_the_config_as_meant(overrides):
    """DeepSpeed's own parser (one process: world size 1) sees our settings."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _cfg(*overrides)
    ds = cfg.deepspeed
    parsed = DeepSpeedConfig(deepspeed_config(cfg))
    assert parsed.train_micro_batch_size_per_gpu == cfg.data.batch_size
    assert parsed.gradient_accumulation_steps == ds.gradient_accumulation_steps
    assert parsed.train_batch_size == cfg.data.batch_size * ds.gradient_accumulation_steps
    assert parsed.gradient_clipping == ds.gradient_clipping
    assert parsed.zero_optimization_stage == ds.zero_stage
    assert parsed.zero_config.overlap_comm == ds.overlap_comm
    if ds.bucket_elements:
        assert parsed.zero_config.reduce_bucket_size == ds.bucket_elements
    assert parsed.torch_autocast_enabled == (ds.precision == "bf16")
    assert parsed.float16_config.enabled == (ds.precision == "fp16")
    assert not parsed.bfloat16_config.enabled  # bf16 is autocast, never DeepSpeed's bf16 mode
