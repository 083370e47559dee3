"""The visual prompt encoder on a tiny config: shapes and padding, independent prompts,
dependence on the image under the (valid-ratio scaled) box, gradients, point prompts, batching."""

import pytest
import torch
from transformers import GroundingDinoConfig

from dinor1.model.prompt_encoder import VisualPromptEncoder, points_to_boxes

D = 32
SHAPES = [(16, 16), (8, 8)]  # (H, W) per level


def _features(batch: int = 2):
    """Random pre-enhancer features; image 1 is padded on the right half at every level."""
    gen = torch.Generator().manual_seed(1)
    feats, pads = [], []
    for h, w in SHAPES:
        pad = torch.zeros(batch, h, w, dtype=torch.bool)
        if batch > 1:
            pad[1, :, w // 2:] = True
        feats.append(torch.randn(batch, h * w, D, generator=gen))
        pads.append(pad.flatten(1))
    ratios = torch.stack([_valid_ratio(~p.view(batch, h, w)) for p, (h, w) in zip(pads, SHAPES)],
                         1)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    return dict(features=torch.cat(feats, 1), feature_padding_mask=torch.cat(pads, 1),
                spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=starts,
                valid_ratios=ratios)


def _valid_ratio(valid: torch.Tensor) -> torch.Tensor:
    """[B, H, W] True = real pixel -> [B, 2] (w, h), as GroundingDinoModel.get_valid_ratio."""
    _, h, w = valid.shape
    return torch.stack([valid[:, 0, :].sum(1) / w, valid[:, :, 0].sum(1) / h], -1).float()


def _level0(features: torch.Tensor, image: int, cols: slice) -> torch.Tensor:
    """A copy of ``features`` with columns ``cols`` of level 0 of one image shifted by +5."""
    h, w = SHAPES[0]
    out = features.clone()
    out[image, : h * w].view(h, w, D)[:, cols] += 5.0
    return out


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = GroundingDinoConfig(d_model=D, num_feature_levels=len(SHAPES))
    return VisualPromptEncoder(config, ffn_dim=64).eval()


@torch.no_grad()
def test_valid_ratios_follow_hf():
    ratios = _features()["valid_ratios"]
    torch.testing.assert_close(ratios, torch.tensor([[[1.0, 1.0]] * 2, [[0.5, 1.0]] * 2]))


@torch.no_grad()
def test_shape_padding_and_no_nan(encoder):
    inputs = _features()
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]],
                          [[0.5, 0.5, 0.1, 0.1], [0.9, 0.1, 0.2, 0.2], [float("nan")] * 4]])
    box_mask = torch.tensor([[True, True, False], [True, True, False]])
    out = encoder(boxes, **inputs, box_mask=box_mask)
    assert out.shape == (2, 3, D) and torch.isfinite(out).all()
    assert (out[:, 2] == 0).all() and (out[:, :2].abs().sum(-1) > 0).all()
    # None means all prompts are real; the real rows do not depend on the padded ones
    torch.testing.assert_close(encoder(boxes[:, :2], **inputs), out[:, :2])


@torch.no_grad()
def test_identity_self_attention(encoder):
    inputs = _features()
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]]] * 2)
    out = encoder(boxes, **inputs)
    moved = boxes.clone()
    moved[:, 1] = torch.tensor([0.2, 0.7, 0.2, 0.2])
    out2 = encoder(moved, **inputs)
    torch.testing.assert_close(out[:, 0], out2[:, 0], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 1], out2[:, 1])


@torch.no_grad()
def test_output_depends_on_features_under_the_box(encoder):
    inputs = _features()
    feats = inputs.pop("features")
    # unpadded image 0: box x in [0.1, 0.3] -> level-0 columns 1..5
    box = torch.tensor([[[0.2, 0.5, 0.2, 0.2]]] * 2)
    before = encoder(box, feats, **inputs)
    under = encoder(box, _level0(feats, 0, slice(1, 6)), **inputs)
    far = encoder(box, _level0(feats, 0, slice(11, 16)), **inputs)
    assert not torch.allclose(before[0], under[0])
    torch.testing.assert_close(before[1], under[1])  # other image untouched
    torch.testing.assert_close(before, far)
    # padded pixels are never attended to, even by a box reaching past the unpadded image
    edge = torch.tensor([[[0.2, 0.5, 0.2, 0.2], [0.95, 0.5, 0.3, 0.3]]] * 2)
    h, w = SHAPES[0]
    torch.testing.assert_close(encoder(edge, feats, **inputs),
                               encoder(edge, _level0(feats, 1, slice(w // 2, w)), **inputs))


@torch.no_grad()
def test_box_is_scaled_by_valid_ratios(encoder):
    """Image 1 is padded to twice its width: its box at cx=0.4 of the unpadded image sits at
    0.2 of the padded level-0 map (columns 2..3), not at 0.4 (columns 5..6)."""
    inputs = _features()
    feats = inputs.pop("features")
    box = torch.tensor([[[0.4, 0.5, 0.1, 0.1]]] * 2)
    before = encoder(box, feats, **inputs)
    scaled = encoder(box, _level0(feats, 1, slice(2, 4)), **inputs)
    unscaled = encoder(box, _level0(feats, 1, slice(5, 7)), **inputs)
    assert not torch.allclose(before[1], scaled[1])
    torch.testing.assert_close(before, unscaled)


@torch.no_grad()
def test_reference_is_the_box_scaled_like_the_hf_decoder(encoder):
    seen = {}
    hook = encoder.cross_attn.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        inputs = _features()
        boxes = torch.tensor([[[0.4, 0.5, 0.2, 0.6]]] * 2)
        encoder(boxes, **inputs)
    finally:
        hook.remove()
    ratios = inputs["valid_ratios"]  # image 1: (w, h) = (0.5, 1) at both levels
    expected = boxes[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]  # GroundingDinoDecoder
    assert seen["reference_points"].shape == (2, 1, len(SHAPES), 4)
    torch.testing.assert_close(seen["reference_points"], expected)
    torch.testing.assert_close(seen["reference_points"][1, 0, 0], torch.tensor([0.2, 0.5, 0.1, 0.6]))
    assert torch.equal(seen["attention_mask"], ~inputs["feature_padding_mask"])  # True = valid


def test_gradients_reach_every_parameter(encoder):
    inputs = _features()
    encoder.zero_grad()
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3], [0.1, 0.2, 0.0, 0.0]]] * 2)
    box_mask = torch.tensor([[True, True, False], [True, True, True]])
    out = encoder(boxes, **inputs, box_mask=box_mask)
    # a plain sum is blind to everything before the final LayerNorm (its rows sum to beta)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 1e-6, name


@torch.no_grad()
def test_points_to_boxes_run_through_forward(encoder):
    points = torch.tensor([[[0.4, 0.4], [0.7, 0.2]]] * 2)
    boxes = points_to_boxes(points, size=0.02)
    assert boxes.shape == (2, 2, 4)
    torch.testing.assert_close(boxes[..., :2], points)
    assert (boxes[..., 2:] == 0.02).all()
    out = encoder(boxes, **_features())
    assert out.shape == (2, 2, D) and torch.isfinite(out).all()


@torch.no_grad()
def test_single_image_equals_its_row_in_the_batch(encoder):
    both_inputs, alone_inputs = _features(), _features()
    alone_inputs.update({k: both_inputs[k][:1] for k in
                         ("features", "feature_padding_mask", "valid_ratios")})
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]],
                          [[0.6, 0.5, 0.3, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    both = encoder(boxes, **both_inputs)
    alone = encoder(boxes[:1], **alone_inputs)
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
