"""The swin-t model's CUDA path, run on fake ``cuda`` tensors (tests/fake_cuda.py) at a real
input size (2 x 3 x 800 x 1333 pixels; fake tensors hold no data, so this costs no memory).

What these tests catch: tensors left on the CPU (created without ``device=``, module-level
constants, buffers not moved) meeting ``cuda`` tensors in one op, and shape errors, on the same
code path a GPU runs; the swin-t preset at full size (900 queries, 4 levels, 6 + 6 layers).

What they cannot catch:
- generator-device errors (a CPU ``torch.Generator`` for a ``cuda`` tensor): FakeTensorMode
  ignores generators; that is ``generator_device_guard``'s job (tests/test_device_randomness_
  guard.py), entered here too;
- numerics (bf16 / TF32, NaN, overflow), CUDA kernels, memory, speed: nothing is computed;
- data-dependent code (``.item()``, ``.tolist()``, Hungarian matching, boolean-mask indexing,
  the prompt assembly's per-category loop): it raises ``DataDependentOutputException``;
- the feature enhancer's deformable layers in training mode (a data-dependent ``isfinite`` check
  in ``transformers``), so the forward test runs those in eval mode;
- backward: autograd aborts the process on fake cuda in a CPU build, so all runs are no_grad;
- ``transformers``' per-call value checks in deformable attention (``torch_compilable_check``,
  sum of level sizes == sequence length): they read tensor values, so they are switched off here
  with ``TRANSFORMERS_DISABLE_TORCH_CHECK=1`` (the CPU tests still run them);
- device mismatches in indexing (``x[cpu_index]``, ``x[...] = cpu_values``): GPUs accept most of
  them, and fake_cuda() runs indexing around the missing CUDA device guard without the check.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorDeviceMismatchError,
    unset_fake_temporarily,
)

from dinor1.model.denoising import build_denoising_queries
from dinor1.model.dino_r1 import DinoR1, DinoR1Settings
from dinor1.model.presets import preset_config
from dinor1.model.prompts import ExemplarLayout
from dinor1.objectives.reference import ReferenceModel
from tests.fake_cuda import build_on_fake_cuda, fake_cuda

BATCH, HEIGHT, WIDTH = 2, 800, 1333
PROMPTS = 3  # U visual prompts
BOXES = 5  # P box prompts per image
CUDA = torch.device("cuda", 0)


@pytest.fixture
def mode(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    with fake_cuda() as fake_mode:
        yield fake_mode


@pytest.fixture
def model(mode):
    return build_on_fake_cuda(lambda: DinoR1(preset_config("swin-t"), DinoR1Settings()))


@pytest.fixture
def images(mode):
    pixels = torch.empty(BATCH, 3, HEIGHT, WIDTH, device="cuda")
    mask = torch.ones(BATCH, HEIGHT, WIDTH, dtype=torch.long, device="cuda")
    return pixels, mask


def _on_cuda(value) -> bool:
    return isinstance(value, FakeTensor) and value.device == CUDA


# ------------------------------------------------------------------------ the fake layer itself
def test_cuda_tensors_exist_and_mixing_with_cpu_raises(mode):
    x = torch.ones(3, device="cuda")
    assert _on_cuda(x * 2)
    assert _on_cuda(x * torch.tensor(2.0))  # a 0-dim CPU tensor is allowed, as on a GPU
    with pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu"):
        x + torch.ones(3)


def test_bindings_without_a_cuda_device_guard_work(mode):
    x = torch.zeros(4, 6, device="cuda")
    x[1:3] = 1.0
    x[x > 0] = 2.0
    assert _on_cuda(x[1]) and x[1].shape == (6,)
    assert _on_cuda(x[:, ::2]) and x[:, ::2].shape == (4, 3)
    assert _on_cuda(x.t().contiguous()) and x.t().contiguous().is_contiguous()
    assert _on_cuda(x.copy_(torch.ones(4, 6)))  # copies across devices are legal
    assert _on_cuda(x.new_tensor([1.0, 2.0]))
    assert _on_cuda(~(x > 0))


def test_fake_cuda_restores_tensor_methods():
    names = ("__getitem__", "__setitem__", "contiguous", "copy_", "new_tensor", "__invert__")
    before = {name: vars(torch.Tensor).get(name) for name in names}
    with fake_cuda():
        pass
    assert {name: vars(torch.Tensor).get(name) for name in names} == before
    assert torch.zeros(2, 2).t().contiguous().is_contiguous()


def test_model_is_built_on_fake_cuda(model):
    assert all(_on_cuda(p) for p in model.parameters())
    # buffers too; values computed in __init__ (e.g. Swin's relative position index) are garbage
    assert all(_on_cuda(b) for b in model.buffers())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".swin.layernorm." in n)


# ------------------------------------------------------------------------------- swin-t stages
def test_image_features(model, images):
    features = model.image_features(*images)
    tensors = {k: v for k, v in vars(features).items() if isinstance(v, torch.Tensor)}
    assert all(_on_cuda(v) for v in tensors.values()), {k: v.device for k, v in tensors.items()}
    tokens = sum(h * w for h, w in features.spatial_shapes_list)
    assert features.spatial_shapes_list == [(100, 167), (50, 84), (25, 42), (13, 21)]
    assert features.source.shape == (BATCH, tokens, 256)
    assert features.valid.shape == (BATCH, tokens)
    assert features.position.shape == (BATCH, tokens, 256)
    assert features.spatial_shapes.shape == (4, 2) and features.level_start_index.shape == (4,)
    assert features.valid_ratios.shape == (BATCH, 4, 2)


def test_visual_prompt_encoder(model, images):
    features = model.image_features(*images)
    boxes = torch.rand(BATCH, BOXES, 4, device="cuda")
    box_mask = torch.ones(BATCH, BOXES, dtype=torch.bool, device="cuda")
    embeddings = model.encode_boxes(features, boxes, box_mask)
    assert _on_cuda(embeddings) and embeddings.shape == (BATCH, BOXES, 256)


def test_cpu_boxes_into_the_prompt_encoder_raise(model, images):
    # the bug class this layer is for: a batch tensor left on the CPU
    features = model.image_features(*images)
    boxes = torch.rand(BATCH, BOXES, 4)
    box_mask = torch.ones(BATCH, BOXES, dtype=torch.bool, device="cuda")
    with pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu"):
        model.encode_boxes(features, boxes, box_mask)


def test_enhancer_query_selection_and_decoder(model, images):
    # training mode, as the train step runs it (dropout, Swin's drop path), except the feature
    # enhancer's deformable layers: in training they test `torch.isfinite(h).all()` (transformers,
    # GroundingDinoDeformableLayer.forward), a data-dependent branch fake tensors cannot take
    model.train()
    for layer in model.core.encoder.layers:
        layer.deformable_layer.eval()
    features = model.image_features(*images)
    prompts = model.visual_prompts(torch.empty(BATCH, PROMPTS, 256, device="cuda"))
    out = model(*images, prompts, features=features)
    layers, queries = model.config.decoder_layers, model.config.num_queries
    expected = {
        "logits": (layers, BATCH, queries, PROMPTS),
        "boxes": (layers, BATCH, queries, 4),
        "encoder_logits": (BATCH, queries, PROMPTS),
        "encoder_boxes": (BATCH, queries, 4),
        "selected_indices": (BATCH, queries),
        "objectness": (BATCH, queries),
        "prompt_mask": (BATCH, PROMPTS),
        "prompts": (BATCH, PROMPTS, 256),
    }
    for name, shape in expected.items():
        value = getattr(out, name)
        assert _on_cuda(value) and value.shape == shape, (name, value.device, value.shape)
    assert out.dn_logits is None and out.dn_boxes is None


def test_reference_forward(model, images):
    model.eval()
    features = model.image_features(*images)
    prompts = torch.empty(BATCH, PROMPTS, 256, device="cuda")
    out = model.reference_forward(*images, prompts, features=features)
    tokens = features.source.shape[1]
    assert _on_cuda(out.token_objectness) and out.token_objectness.shape == (BATCH, tokens)
    assert _on_cuda(out.selected_indices)
    assert out.selected_indices.shape == (BATCH, model.config.num_queries)


# ------------------------------------------------------------------ GRQO's frozen reference model
def _uninitialised_cpu_swin_t():
    """What ReferenceModel's factory would build, without random init (``.to(cuda)`` of a module
    whose parameters are already fake fails in torch's swap_tensors, so the copy starts real)."""
    with unset_fake_temporarily():
        with torch.device("meta"):
            model = DinoR1(preset_config("swin-t"), DinoR1Settings())
        return model.to_empty(device="cpu")


def test_reference_model_builds_and_refreshes_on_cuda(model):
    reference = ReferenceModel(model, refresh="epoch", factory=_uninitialised_cpu_swin_t)
    assert reference.device == CUDA and reference.pruned
    kept = [p for n, p in reference.model.named_parameters() if n not in reference.pruned]
    assert all(_on_cuda(p) for p in kept)
    reference.refresh(model, step=1)  # the policy's cuda weights, via a full CPU state dict
    assert reference.refreshes == 2


def test_reference_objectness(mode, model, images):
    reference = ReferenceModel(model, refresh="never", factory=_uninitialised_cpu_swin_t)
    boxes = [torch.rand(3, 4, device="cuda"), torch.rand(1, 4, device="cuda")]
    with unset_fake_temporarily():  # host bookkeeping (data-dependent), as the step does it
        real = ExemplarLayout.of(torch.tensor([[[0, 0]], [[0, 2]], [[1, 0]]]), [3, 1])
    # its tensors as host (CPU) tensors of the fake world, as the step hands them over
    layout = ExemplarLayout(*(mode.from_tensor(t) for t in vars(real).values()))
    selected = torch.zeros(BATCH, model.config.num_queries, dtype=torch.long, device="cuda")
    logits = reference.objectness(*images, boxes, layout, selected)
    assert _on_cuda(logits) and logits.shape == selected.shape


# ---------------------------------------------------------------- contrastive denoising queries
def _dn_targets():
    return [{"labels": torch.tensor([0, 2, 1], device="cuda"), "boxes": torch.rand(3, 4, device="cuda")},
            {"labels": torch.tensor([2], device="cuda"), "boxes": torch.rand(1, 4, device="cuda")}]


def test_cdn_queries_on_cuda_with_a_cpu_generator(mode):
    """The first-step crash of every GPU run: CDN noise drawn with the loop's CPU generator for
    ``cuda`` queries (on a GPU: "Expected a 'cuda' device type for generator"). The guard raises
    as CUDA does on the old code; now draws happen on the generator's device and move."""
    prompts = torch.empty(BATCH, PROMPTS, 256, device="cuda")
    dn = build_denoising_queries(_dn_targets(), prompts, 900, num_dn_queries=100,
                                 generator=torch.Generator().manual_seed(0))
    for name in ("content", "reference_logits", "labels", "attn_mask"):
        assert _on_cuda(getattr(dn, name)), name
    assert dn.meta.num_dn == 96 and dn.attn_mask.shape == (996, 996)
    assert all(_on_cuda(q) and _on_cuda(g) for q, g in dn.meta.positive_pairs)


def test_cdn_queries_of_a_dense_image_on_cuda(mode):
    """300 boxes: the random subset that gets dn queries is drawn and moved the same way."""
    targets = [{"labels": torch.zeros(300, dtype=torch.long, device="cuda"),
                "boxes": torch.rand(300, 4, device="cuda")}]
    dn = build_denoising_queries(targets, torch.empty(1, PROMPTS, 256, device="cuda"), 900,
                                 num_dn_queries=100, generator=torch.Generator().manual_seed(0))
    assert dn.meta.num_dn == 100 and _on_cuda(dn.meta.positive_pairs[0][1])


def test_decoder_with_cdn_queries(model, images):
    model.train()
    for layer in model.core.encoder.layers:
        layer.deformable_layer.eval()  # (see test_enhancer_query_selection_and_decoder)
    features = model.image_features(*images)
    embeddings = torch.empty(BATCH, PROMPTS, 256, device="cuda")
    dn = build_denoising_queries(_dn_targets(), embeddings, model.config.num_queries,
                                 num_dn_queries=model.settings.num_dn_queries,
                                 generator=torch.Generator().manual_seed(0))
    out = model(*images, model.visual_prompts(embeddings), features=features, denoising=dn)
    layers = model.config.decoder_layers
    assert _on_cuda(out.dn_logits) and out.dn_logits.shape == (layers, BATCH, 96, PROMPTS)
    assert _on_cuda(out.dn_boxes) and out.dn_boxes.shape == (layers, BATCH, 96, 4)
    assert out.logits.shape == (layers, BATCH, model.config.num_queries, PROMPTS)
