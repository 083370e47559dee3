"""Run the CUDA code path on a CPU-only machine: fake ``cuda`` tensors and a generator check.

``fake_cuda()`` enters PyTorch's ``FakeTensorMode``: tensors carry a device, a shape and a dtype
but no data, so a swin-t forward at 800 x 1333 costs no memory and ``device="cuda"`` works on a
CPU build. Mixing a ``cuda`` and a (non-scalar) ``cpu`` tensor in one op raises
``FakeTensorDeviceMismatchError``, as it would on a GPU.

What the CPU build of PyTorch lacks, and how it is worked around here (torch 2.13):

- No CUDA device guard is linked in, and ``FakeTensorMode``'s own fallback
  (``torch._C._ensureCUDADeviceGuardSet``) does nothing in a CPU build. A few hand-written
  Python bindings open a device guard before dispatching (``Tensor.__getitem__``,
  ``__setitem__``, ``contiguous``, ``copy_``, ``new_tensor``, ``__invert__``) and fail with
  "PyTorch is not linked with support for cuda devices" (this is the "in-place slice write"
  failure). Inside ``fake_cuda()`` these go around the guard: the last four as the equivalent
  ``torch.ops.aten`` call (fully checked by the mode), indexing by running the binding on the
  tensors' meta storage as the mode runs any kernel. As a cost, indexing does not check the
  devices of index tensors or assigned values (a GPU accepts CPU indices and copies CPU values).
- Autograd records a stream per CUDA input (``InputMetadata``), which also needs the guard and
  then aborts the whole process (``terminate called``), so ``fake_cuda()`` runs under
  ``torch.no_grad()``: forward passes only, no backward.
- ``Module.to(...)`` of a module whose parameters are already fake fails (torch swaps fake
  parameters, and the mode's weak references block the swap); build with ``build_on_fake_cuda``
  or move a real (CPU / ``to_empty``) module into the mode.
- Random init on fake ``cuda`` needs the CUDA default generator: build on ``meta`` and
  ``to_empty`` (``build_on_fake_cuda``).
- ``.item()`` / ``.tolist()`` / data-dependent shapes raise ``DataDependentOutputException``.

``FakeTensorMode`` never looks at ``generator=`` arguments, while a GPU raises "Expected a
'cuda' device type for generator but found 'cpu'"; ``generator_device_guard()`` adds that check
(``fake_cuda()`` enters it too, unless told not to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorMode,
    in_kernel_invocation_manager,
    unset_fake_temporarily,
)

# torch functions that take ``generator=`` and create a new tensor: name -> how to find the
# output's device from the call ("device": the device= kwarg or the default device; "input":
# the first tensor argument, unless device= is given).
GENERATOR_FUNCTIONS = {
    "rand": "device", "randn": "device", "randint": "device", "randperm": "device",
    "normal": "input", "bernoulli": "input", "multinomial": "input", "poisson": "input",
    "rand_like": "input", "randn_like": "input", "randint_like": "input",
}
# in-place Tensor methods that take ``generator=``: the output is ``self``
GENERATOR_METHODS = ("uniform_", "normal_", "random_", "bernoulli_", "exponential_",
                     "geometric_", "log_normal_", "cauchy_")


@contextlib.contextmanager
def _replaced(owner, name: str, replacement) -> Iterator[None]:
    """Set ``owner.name`` for the duration; afterwards exactly the previous state (an inherited
    attribute is deleted again rather than copied onto ``owner``)."""
    own = name in vars(owner)
    previous = vars(owner)[name] if own else None
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


def _output_device(kind: str, args, kwargs) -> torch.device:
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    if kind == "input":
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.device
    return torch.get_default_device()


def _check_generator(name: str, generator, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise RuntimeError(f"Expected a '{device.type}' device type for generator but found "
                           f"'{generator.device.type}' (in {name}; generator_device_guard)")


def _checked_function(name: str, function: Callable, kind: str) -> Callable:
    def checked(*args, **kwargs):
        _check_generator(name, kwargs.get("generator"), _output_device(kind, args, kwargs))
        return function(*args, **kwargs)

    checked.__wrapped__ = function
    return checked


def _checked_method(name: str, method: Callable) -> Callable:
    def checked(self, *args, **kwargs):
        _check_generator(f"Tensor.{name}", kwargs.get("generator"), self.device)
        return method(self, *args, **kwargs)

    checked.__wrapped__ = method
    return checked


@contextlib.contextmanager
def generator_device_guard() -> Iterator[None]:
    """Make torch's random functions raise when ``generator=`` is on another device type than
    the tensor they fill, as CUDA kernels do. Everything is restored on exit.

    Only keyword ``generator=`` is checked (the way this project passes it); functions imported
    by name before entering (``from torch import rand``) are not wrapped.
    """
    with contextlib.ExitStack() as stack:
        for name, kind in GENERATOR_FUNCTIONS.items():
            stack.enter_context(_replaced(
                torch, name, _checked_function(name, getattr(torch, name), kind)))
        for name in GENERATOR_METHODS:
            stack.enter_context(_replaced(
                torch.Tensor, name, _checked_method(name, getattr(torch.Tensor, name))))
        yield


def _is_fake_cuda(value) -> bool:
    return isinstance(value, FakeTensor) and value.fake_device.type == "cuda"


def _around_device_guard(binding: Callable) -> Callable:
    """Run a guarded binding on fake cuda tensors as FakeTensorMode runs any op: on their meta
    storage, then wrap the results back as fake tensors on the original device."""

    def run(self, *args, **kwargs):
        if not _is_fake_cuda(self):
            return binding(self, *args, **kwargs)
        with in_kernel_invocation_manager(self.fake_mode):
            out = binding(self, *args, **kwargs)
        if isinstance(out, torch.Tensor) and not isinstance(out, FakeTensor):
            out = self.fake_mode.fake_tensor_converter.from_meta_and_device(
                self.fake_mode, out, self.fake_device)
        return out

    run.__wrapped__ = binding
    return run


def _copy_without_guard(self, src, non_blocking: bool = False):
    if not _is_fake_cuda(self):
        return torch._C.TensorBase.copy_(self, src, non_blocking)
    return torch.ops.aten.copy_.default(self, src, non_blocking)


def _contiguous_without_guard(self, memory_format=torch.contiguous_format):
    if not _is_fake_cuda(self):
        return torch._C.TensorBase.contiguous(self, memory_format=memory_format)
    return torch.ops.aten.contiguous.default(self, memory_format=memory_format)


def _invert_without_guard(self):
    if not _is_fake_cuda(self):
        return torch._C.TensorBase.__invert__(self)
    return torch.ops.aten.bitwise_not.default(self)


def _new_tensor_without_guard(self, data, dtype=None, device=None, requires_grad=False):
    if not _is_fake_cuda(self):
        return torch._C.TensorBase.new_tensor(self, data, dtype=dtype, device=device,
                                              requires_grad=requires_grad)
    dtype, device = dtype or self.dtype, device or self.device
    if isinstance(data, torch.Tensor):
        return data.detach().to(device=device, dtype=dtype, copy=True)
    return torch.tensor(data, dtype=dtype, device=device)


# indexing bindings (torch 2.13) that open a CUDA device guard before dispatching
_INDEXING_BINDINGS = ("__getitem__", "__setitem__")


@contextlib.contextmanager
def fake_cuda(*, check_generators: bool = True,
              allow_non_fake_inputs: bool = True) -> Iterator[FakeTensorMode]:
    """Fake ``cuda`` tensors on a CPU build; yields the ``FakeTensorMode``.

    Args:
        check_generators: also enter :func:`generator_device_guard`.
        allow_non_fake_inputs: let real (CPU or meta) tensors made outside into ops; they become
            fake tensors on their own device, so a real CPU tensor in a cuda op still raises.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=allow_non_fake_inputs)
    with contextlib.ExitStack() as stack:
        for name in _INDEXING_BINDINGS:
            stack.enter_context(_replaced(
                torch.Tensor, name, _around_device_guard(getattr(torch.Tensor, name))))
        stack.enter_context(_replaced(torch.Tensor, "copy_", _copy_without_guard))
        stack.enter_context(_replaced(torch.Tensor, "contiguous", _contiguous_without_guard))
        stack.enter_context(_replaced(torch.Tensor, "new_tensor", _new_tensor_without_guard))
        stack.enter_context(_replaced(torch.Tensor, "__invert__", _invert_without_guard))
        if check_generators:
            stack.enter_context(generator_device_guard())
        stack.enter_context(torch.no_grad())
        stack.enter_context(mode)
        yield mode


def build_on_fake_cuda(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build ``factory()`` on ``meta`` and give it (uninitialised) fake cuda storage.

    Call inside :func:`fake_cuda`. Parameters and buffers keep their shapes and dtypes but hold
    no values (buffers computed in ``__init__``, persistent or not, are garbage): fine for
    device and shape checks, not for anything that reads values.
    """
    if not isinstance(torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE),
                      FakeTensorMode):
        raise RuntimeError("build_on_fake_cuda must be called inside fake_cuda()")
    with unset_fake_temporarily(), torch.device("meta"):  # real meta tensors, not fake ones
        module = factory()
    return module.to_empty(device="cuda")
