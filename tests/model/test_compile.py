"""Speed options (dinor1/model/compile.py): compiled hot submodules and channels-last give the
same step as the plain model, and leave parameter names (checkpoints, ZeRO) unchanged."""

import pytest
import torch

from dinor1.model.compile import compile_hot_modules, hot_modules, use_channels_last
from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.objectives.step import training_losses


def _batch():
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]])
    return {"pixel_values": torch.randn(2, 3, 96, 128, generator=g),
            "pixel_mask": torch.ones(2, 96, 128, dtype=torch.long),
            "boxes": boxes, "class_labels": torch.tensor([3, 5, 5]),
            "num_boxes": torch.tensor([2, 1])}


def _loss_and_grads(model):
    loss, _ = training_losses(model, _batch(), generators=torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _pair():
    # eval mode: Swin's stochastic depth would draw different random numbers in a compiled
    # graph; gradients are still computed
    torch.manual_seed(0)
    plain = DinoR1(tiny_cpu()).eval()
    other = DinoR1(tiny_cpu()).eval()
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_hot_modules_cover_the_repeated_layers():
    model = DinoR1(tiny_cpu())
    names = hot_modules(model)
    config = model.config
    assert len(names) == 2 + config.encoder_layers + config.decoder_layers
    assert "gdino.model.backbone" in names and "prompt_encoder" in names


@pytest.mark.slow
def test_compiled_step_matches_eager():
    plain, compiled = _pair()
    keys = list(compiled.state_dict())
    names = compile_hot_modules(compiled, backend="aot_eager")  # traced, no C++ build
    assert list(compiled.state_dict()) == keys  # in place: checkpoints load either way
    assert all(compiled.get_submodule(n)._compiled_call_impl is not None for n in names)
    loss, grads = _loss_and_grads(plain)
    compiled_loss, compiled_grads = _loss_and_grads(compiled)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_channels_last_matches_plain():
    plain, nhwc = _pair()
    use_channels_last(nhwc)
    convs = [m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                         for m in convs if m.weight.shape[-1] > 1 or m.weight.shape[-2] > 1)
    loss, grads = _loss_and_grads(plain)
    nhwc_loss, nhwc_grads = _loss_and_grads(nhwc)
    torch.testing.assert_close(nhwc_loss, loss, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(nhwc_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
