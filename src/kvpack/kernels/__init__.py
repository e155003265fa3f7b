"""Kernel dispatch: one ``torch.library`` op per kernel, and the backend policy.

Each method defines its kernels in ``kvpack/methods/<name>/ops.py`` with :class:`Kernel`: a schema, the
pure-torch reference (the oracle, and the implementation for every device without a kernel of its own), a
fake implementation (output shapes, for meta tensors and tracing), and optionally a fast CPU kernel behind
the check of what that kernel trusts. Each becomes the op ``torch.ops.kvpack.<name>``:

* ``CompositeExplicitAutograd``: the reference (any device);
* ``CPU``: the fast kernel when the backend policy allows it, else the reference;
* ``CUDA``: the Triton kernel (``methods/<name>/triton.py``, imported on first use) when the backend policy
  allows it and Triton is installed, else the reference;
* ``Meta``: the fake.

The backend is chosen by, innermost first, the context manager :func:`use`, the environment variable
``KVPACK_KERNELS``, else ``"auto"``:

* ``"auto"``: the fast kernel (C++ on CPU, Triton on CUDA) where it can run, else the reference (one logged
  warning per reason);
* ``"fast"``: the fast kernel or :class:`KernelUnavailableError` (nothing falls back silently);
* ``"reference"``: always the reference (the oracle the tests compare against).

Malformed arguments (tensors whose shapes disagree, wrong ranks or types) raise ``TypeError`` /
``ValueError`` on the fast path before any pointer reaches the C++. The op layer costs about 2 us per call
over calling the implementation directly (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from collections.abc import Callable, Iterator

import torch

__all__ = ["BACKENDS", "Kernel", "KernelUnavailableError", "backend", "registered", "triton_kernel", "use"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "fast", "reference")
_ENV = "KVPACK_KERNELS"
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvpack_kernels_backend", default=None)
_warned: set[tuple[str, str]] = set()
_LIBRARY = torch.library.Library("kvpack", "DEF")
_KERNELS: dict[str, Kernel] = {}


class KernelUnavailableError(RuntimeError):
    """The fast backend was requested explicitly but cannot run (the message says why)."""


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def backend() -> str:
    """The backend in force: the innermost :func:`use`, else ``$KVPACK_KERNELS``, else ``"auto"``."""
    name = _requested.get()
    if name is not None:
        return name
    return _check_backend(os.environ.get(_ENV, "auto") or "auto", _ENV)


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the enclosed code with kernel backend ``name`` (one of :data:`BACKENDS`).

    Raises:
        ValueError: unknown backend.
        KernelUnavailableError: ``"fast"`` requested and the fast library cannot be built or loaded here.
    """
    _check_backend(name, "backend")
    if name == "fast":
        from . import native

        reason = native.available()
        if reason:
            raise KernelUnavailableError(f"the fast kernel backend cannot run: {reason}")
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


class Kernel:
    """One kernel, registered as ``torch.ops.kvpack.<name>``; call it like the reference.

    Args:
        name: op name.
        schema: the op's arguments and returns, e.g. ``"(Tensor query, Tensor codes, int bits) -> Tensor"``.
        reference: the pure-torch implementation (the oracle).
        fake: output tensors of the right shapes and dtypes for these inputs (no data).
        check: for the fast CPU kernel: raises ``TypeError``/``ValueError`` for malformed input, returns why
            well-formed input cannot run fast (another device or dtype), or None.
        cpu: the fast CPU implementation; it may assume ``check`` returned None.
        gpu: ``(gpu_check, gpu)`` of the Triton kernel, two callables that import Triton on first use:
            ``gpu_check`` returns why well-formed input (``check`` ran first) cannot take the Triton kernel, or
            None; ``gpu`` runs it. Any tensor device Triton runs on (CUDA; CPU under ``TRITON_INTERPRET=1``,
            which the tests use through :attr:`gpu` directly).
    """

    def __init__(self, name: str, schema: str, reference: Callable, fake: Callable,
                 check: Callable | None = None, cpu: Callable | None = None,
                 gpu: tuple[Callable, Callable] | None = None) -> None:  # fmt: skip
        if name in _KERNELS:
            raise ValueError(f"kernel {name!r} is registered twice")
        self.name, self.reference, self.fake, self.check, self.cpu = name, reference, fake, check, cpu
        self.gpu_check, self.gpu = gpu if gpu is not None else (None, None)
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, self._default, "CompositeExplicitAutograd")
        if cpu is not None:
            _LIBRARY.impl(name, self._cpu, "CPU")
        if self.gpu is not None:
            _LIBRARY.impl(name, self._cuda, "CUDA")
        torch.library.register_fake(f"kvpack::{name}", self._fake, lib=_LIBRARY)
        self.op = getattr(torch.ops.kvpack, name).default
        _KERNELS[name] = self

    def __call__(self, *args):
        # Plain CPU tensors skip the dispatcher (~4 us a call, 30 layers x 2 kernels a token) and go straight
        # to the CPU registration, which checks every argument (another device among them: the reference).
        # Tensor subclasses (fake tensors while tracing) and other devices take the op.
        first = args[0]
        if type(first) is torch.Tensor and first.device.type == "cpu" and self.cpu is not None:
            return self._cpu(*args)
        try:
            return self.op(*args)
        except RuntimeError as err:  # the dispatcher's own argument-type check: report it as what it is
            if "Expected a value of type" in str(err):
                raise TypeError(str(err).split("\n")[0]) from None
            raise

    def fast_or_none(self, *args) -> Callable | None:
        """The fast implementation for these arguments under the backend policy, or None (the reference)."""
        name = backend()
        if name == "reference" or self.cpu is None:
            if self.check is not None:
                self.check(*args)  # malformed input raises the same clear error under every policy
            return None
        from . import native

        reason = native.available() or self.check(*args)  # the check raises for malformed arguments
        if reason is None:
            return self.cpu
        return self._fall_back(name, reason)

    def gpu_or_none(self, *args) -> Callable | None:
        """The Triton implementation for these (CUDA) arguments under the backend policy, or None (the
        reference)."""
        name = backend()
        if self.check is not None:
            self.check(*args)  # malformed input raises the same clear error on every device and policy
        if name == "reference":
            return None
        from . import gpu

        reason = gpu.available() or self.gpu_check(*args)
        if reason is None:
            return self.gpu
        return self._fall_back(name, reason)

    def _fall_back(self, name: str, reason: str) -> None:
        if name == "fast":
            raise KernelUnavailableError(f"{self.name}: the fast kernel backend was requested but cannot run: {reason}")
        if (self.name, reason) not in _warned:
            _warned.add((self.name, reason))
            logger.warning("%s runs the slow pure-torch reference kernel: %s", self.name, reason)
        return None

    def _cpu(self, *args):
        fast = self.fast_or_none(*args)
        if fast is None:
            _one_device(self.name, args)  # the fast path's check has already seen every tensor on the CPU
            return self.reference(*args)
        return fast(*args)

    def _cuda(self, *args):
        fast = self.gpu_or_none(*args)
        if fast is None:
            _one_device(self.name, args)
            return self.reference(*args)
        return fast(*args)

    def _default(self, *args):
        """Every device without a kernel of its own: the reference, after the same structural check (so
        malformed input, or None where a tensor belongs, raises the check's clear error there too)."""
        if self.check is not None:
            self.check(*args)
        _one_device(self.name, args)
        return self.reference(*args)

    def _fake(self, *args):
        """Output shapes; refuses tensors on several devices (one meta argument among CPU tensors routes
        the call here, and the outputs would be allocated, uninitialized, on the CPU)."""
        _one_device(self.name, args)
        return self.fake(*args)

    def __repr__(self) -> str:
        return f"Kernel(kvpack::{self.name}, CPU kernel: {self.cpu is not None}, Triton kernel: {self.gpu is not None})"


def _one_device(name: str, args) -> None:
    """Raise ``ValueError`` unless every tensor argument is on one device (torch ops given a mix of meta and
    CPU tensors can return uninitialized CPU memory instead of failing)."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    devices |= {x.device for a in args if isinstance(a, (list, tuple)) for x in a if isinstance(x, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"{name}: the tensors are on several devices: {sorted(map(str, devices))}")


def triton_kernel(module: str, name: str) -> tuple[Callable, Callable]:
    """A :class:`Kernel`'s ``gpu`` pair: ``module``'s ``<name>_reason`` and ``<name>``, the module imported at
    the first call (it imports Triton; importing kvpack must not)."""

    def attribute(attr: str) -> Callable:
        def call(*args):
            return getattr(importlib.import_module(module), attr)(*args)

        return call

    return attribute(name + "_reason"), attribute(name)


def registered() -> dict[str, Kernel]:
    """Every kernel defined so far, by name (the methods' ``ops`` modules define them on import)."""
    return dict(_KERNELS)
