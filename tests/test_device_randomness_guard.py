"""The generator-device guard of tests/fake_cuda.py: it raises where CUDA would ("Expected a
'cuda' device type for generator"), passes matching devices, and restores torch afterwards."""

import pytest
import torch

from tests.fake_cuda import (
    GENERATOR_FUNCTIONS,
    GENERATOR_METHODS,
    fake_cuda,
    generator_device_guard,
)

CUDA_GENERATOR_ERROR = "Expected a 'cuda' device type for generator but found 'cpu'"


def _cuda_calls(generator):
    """Every wrapped function and method, producing a cuda tensor from a CPU generator."""
    probs = torch.full((2, 3), 0.5, device="cuda")
    return {
        "rand": lambda: torch.rand(3, generator=generator, device="cuda"),
        "randn": lambda: torch.randn(3, generator=generator, device="cuda"),
        "randint": lambda: torch.randint(0, 5, (3,), generator=generator, device="cuda"),
        "randperm": lambda: torch.randperm(3, generator=generator, device="cuda"),
        "normal": lambda: torch.normal(probs, probs, generator=generator),
        "bernoulli": lambda: torch.bernoulli(probs, generator=generator),
        "multinomial": lambda: torch.multinomial(probs, 2, generator=generator),
        "poisson": lambda: torch.poisson(probs, generator=generator),
        "rand_like": lambda: torch.rand_like(probs, generator=generator),
        "randn_like": lambda: torch.randn_like(probs, generator=generator),
        "randint_like": lambda: torch.randint_like(probs, 5, generator=generator),
        "uniform_": lambda: probs.uniform_(generator=generator),
        "normal_": lambda: probs.normal_(generator=generator),
        "random_": lambda: probs.random_(generator=generator),
        "bernoulli_": lambda: probs.bernoulli_(generator=generator),
        "exponential_": lambda: probs.exponential_(generator=generator),
        "geometric_": lambda: probs.geometric_(0.5, generator=generator),
        "log_normal_": lambda: probs.log_normal_(generator=generator),
        "cauchy_": lambda: probs.cauchy_(generator=generator),
    }


def test_cpu_generator_for_a_cuda_tensor_raises():
    with fake_cuda():
        with pytest.raises(RuntimeError, match=CUDA_GENERATOR_ERROR):
            torch.rand(3, generator=torch.Generator(), device="cuda")


@pytest.mark.parametrize("name", sorted(set(GENERATOR_FUNCTIONS) | set(GENERATOR_METHODS)))
def test_every_wrapped_call_checks_the_output_device(name):
    with fake_cuda():
        call = _cuda_calls(torch.Generator())[name]
        with pytest.raises(RuntimeError, match=CUDA_GENERATOR_ERROR):
            call()


def test_the_default_device_is_the_output_device():
    with fake_cuda(), torch.device("cuda"):
        with pytest.raises(RuntimeError, match=CUDA_GENERATOR_ERROR):
            torch.randn(3, generator=torch.Generator())


def test_matching_devices_pass():
    generator = torch.Generator().manual_seed(0)
    with generator_device_guard():
        values = torch.rand(3, generator=generator)
        torch.zeros(3).uniform_(generator=generator)
        torch.randperm(4, generator=generator)
    with fake_cuda():
        torch.rand(3, generator=torch.Generator())  # a fake cpu tensor from a cpu generator
        torch.rand(3, device="cuda")  # no generator: the device's default one
    assert values.device.type == "cpu" and values.shape == (3,)


def test_fake_tensor_mode_alone_does_not_check_generators():
    # why the guard exists: this passes under FakeTensorMode but raises on a real GPU
    with fake_cuda(check_generators=False):
        torch.rand(3, generator=torch.Generator(), device="cuda")


def test_originals_are_restored_on_exit_and_on_error():
    functions = {name: getattr(torch, name) for name in GENERATOR_FUNCTIONS}
    with generator_device_guard():
        assert all(getattr(torch, name) is not f for name, f in functions.items())
        assert all(name in vars(torch.Tensor) for name in GENERATOR_METHODS)
    assert all(getattr(torch, name) is f for name, f in functions.items())
    assert not any(name in vars(torch.Tensor) for name in GENERATOR_METHODS)

    with pytest.raises(KeyError), generator_device_guard():
        raise KeyError("a test failing inside the guard")
    assert all(getattr(torch, name) is f for name, f in functions.items())
    assert not any(name in vars(torch.Tensor) for name in GENERATOR_METHODS)
