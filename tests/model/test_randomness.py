"""The step's randomness: host and device generators made in one place, each used for its part.

On a GPU a generator must live on the output's device: the old loop's single CPU generator
crashed the first CDN draw on CUDA, and one CUDA generator would crash the host-side exemplar
draw instead. These tests pin which generator each part of the step uses (by whose state
advances); tests/model/test_fake_cuda.py runs the CDN builder on fake ``cuda`` tensors under a
guard that raises as CUDA does.
"""

import pytest
import torch

from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.model.randomness import (
    StepGenerators,
    as_step_generators,
    step_generators,
    step_seed,
)
from dinor1.objectives.settings import LossSettings
from dinor1.objectives.step import ObjectiveSettings, training_losses
from tests.helpers import tiny_step_batch

_batch = tiny_step_batch


def test_step_generators_live_where_their_draws_do(device):
    gens = step_generators(step_seed(0, 1, 5), device)
    assert gens.host.device.type == "cpu"
    assert gens.device.device.type == device.type
    again = step_generators(step_seed(0, 1, 5), device)
    assert torch.equal(torch.rand(4, generator=gens.device, device=device),
                       torch.rand(4, generator=again.device, device=device))
    # the two streams differ (a CPU run must not reuse the host draws for the CDN noise)
    cpu = step_generators(3, "cpu")
    assert not torch.equal(torch.rand(8, generator=cpu.host), torch.rand(8, generator=cpu.device))


def test_step_seed_differs_by_rank_and_step():
    seeds = {step_seed(7, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400


def test_a_plain_cpu_generator_is_accepted():
    g = torch.Generator().manual_seed(0)
    gens = as_step_generators(g, "cpu")
    assert gens.host is g and gens.device is g
    assert as_step_generators(None, "cpu") is None
    both = step_generators(0)
    assert as_step_generators(both, "cpu") is both


def _states(gens: StepGenerators) -> tuple[torch.Tensor, torch.Tensor]:
    return gens.host.get_state().clone(), gens.device.get_state().clone()


@pytest.mark.parametrize("denoising", [True, False])
def test_exemplars_draw_on_the_host_generator_and_cdn_on_the_device_one(device, denoising):
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).train().to(device)
    gens = step_generators(11, device)
    host_before, device_before = _states(gens)
    settings = ObjectiveSettings(objectives=LossSettings(denoising=denoising))
    training_losses(model, _batch(device), settings=settings, generators=gens)
    host_after, device_after = _states(gens)
    assert not torch.equal(host_before, host_after)  # exemplar choice
    assert torch.equal(device_before, device_after) != denoising  # CDN noise, when on


def test_same_generators_same_step(device):
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).train().to(device)
    first, _ = training_losses(model, _batch(device), generators=step_generators(4, device))
    again, _ = training_losses(model, _batch(device), generators=step_generators(4, device))
    other, _ = training_losses(model, _batch(device), generators=step_generators(5, device))
    assert torch.equal(first, again) and not torch.equal(first, other)
