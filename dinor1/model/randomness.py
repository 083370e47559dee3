"""The randomness of one training step, and the one place its generators are made.

A step draws random numbers in two places that live on different devices:

* **prompt sampling** (``model/prompts.py``): which instance of each category becomes its
  prompt. This is index arithmetic over a handful of labels, done on the host (a ``torch.randperm``
  style draw on CPU tensors);
* **contrastive denoising** (``model/denoising.py``): label flips and box jitter for every CDN
  slot, drawn where the queries live (the batch's device).

PyTorch requires a generator on the output's device (``torch.rand(..., generator=cpu_generator,
device="cuda")`` raises "Expected a 'cuda' device type for generator"), and one CUDA generator
would move that crash to the host-side draws. So each step gets TWO generators, a host one and one
on the batch's device, seeded together from (seed, rank, step): a resumed run re-creates them
exactly and needs no saved RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the device generator's seed is derived from the host's, so the two streams differ
_DEVICE_SEED_OFFSET = 0x9E3779B97F4A7C15 % (2**63 - 1)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one worker's step: distinct per (seed, rank, step), stable across restarts."""
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1)


@dataclass(frozen=True)
class StepGenerators:
    """The two generators of one step.

    Attributes:
        host: a CPU generator, for draws over host tensors (prompt exemplar choice).
        device: a generator on the batch's device, for draws of device tensors (CDN noise).
    """

    host: torch.Generator
    device: torch.Generator


def step_generators(seed: int, device: torch.device | str = "cpu") -> StepGenerators:
    """Host and device generators seeded together from ``seed``.

    Args:
        seed: e.g. :func:`step_seed` of (run seed, rank, step).
        device: the batch's device (``cuda:3``, ``cpu``, ...).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    host = torch.Generator().manual_seed(seed)
    on_device = torch.Generator(device=device).manual_seed((seed + _DEVICE_SEED_OFFSET)
                                                           % (2**63 - 1))
    return StepGenerators(host=host, device=on_device)


def as_step_generators(generators: StepGenerators | torch.Generator | None,
                       device: torch.device | str) -> StepGenerators | None:
    """Accept a plain generator where :class:`StepGenerators` is expected.

    A generator on the batch's device serves for both draws if it is a CPU one; otherwise a
    device generator is seeded from it (one draw from it), so a CPU generator still gives a
    reproducible step on a GPU batch. ``None`` stays ``None`` (torch's global generators).
    """
    if generators is None or isinstance(generators, StepGenerators):
        return generators
    device = torch.device(device)
    if generators.device.type == "cpu":
        if device.type == "cpu":
            return StepGenerators(host=generators, device=generators)
        seed = int(torch.randint(0, 2**62, (1,), generator=generators))
        return StepGenerators(host=generators, device=step_generators(seed, device).device)
    raise ValueError(f"a single generator for a step must be a CPU generator (got one on "
                     f"{generators.device}); pass StepGenerators(host=..., device=...)")


def draw_on(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where to draw random numbers that are wanted on ``device``: on the generator's own device
    (PyTorch refuses any other), after which the caller moves the result (a no-op when the
    generator is already on ``device``, as :func:`step_generators` arranges)."""
    return device if generator is None else generator.device
