"""The visual prompt encoder: independent prompts, padding, image dependence, gradients."""

import torch

from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.model.prompt_encoder import points_to_boxes


def _setup():
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).eval()
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 96, 96, dtype=torch.long)
    mask[1, :, 64:] = 0
    return model, model.image_features(pixels, mask)


def test_prompts_are_independent_and_padding_is_zero():
    model, feats = _setup()
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3], [0.5, 0.5, 0.1, 0.1]]] * 2)
    box_mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        out = model.encode_boxes(feats, boxes, box_mask)
        moved = boxes.clone()
        moved[:, 1] = torch.tensor([0.2, 0.7, 0.2, 0.2])
        out2 = model.encode_boxes(feats, moved, box_mask)
    assert out.shape == (2, 3, tiny_cpu().d_model) and torch.isfinite(out).all()
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))
    torch.testing.assert_close(out[:, 0], out2[:, 0])  # identity self-attention
    assert not torch.allclose(out[:, 1], out2[:, 1])


def test_output_depends_on_the_image_under_the_box():
    model, feats = _setup()
    boxes = torch.tensor([[[0.25, 0.25, 0.3, 0.3]]] * 2)
    with torch.no_grad():
        before = model.encode_boxes(feats, boxes)
        feats.source = feats.source.clone()
        feats.source[0] += 5.0  # change image 0 only
        after = model.encode_boxes(feats, boxes)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])


def test_points_and_gradients():
    model, feats = _setup()
    model.train()
    boxes = points_to_boxes(torch.tensor([[[0.4, 0.4], [0.7, 0.2]]] * 2))
    assert boxes.shape == (2, 2, 4)
    model.encode_boxes(feats, boxes).sum().backward()
    for name, p in model.prompt_encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_single_image_equals_its_row_in_the_batch():
    model, feats = _setup()
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2]], [[0.6, 0.5, 0.3, 0.2]]])
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 96, 96, dtype=torch.long)
    mask[1, :, 64:] = 0
    with torch.no_grad():
        both = model.encode_boxes(feats, boxes)
        alone = model.encode_boxes(model.image_features(pixels[:1], mask[:1]), boxes[:1])
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
