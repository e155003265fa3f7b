"""The one dispatch point for the decode kernels.

Each function here runs the fast CPU kernel (:mod:`kvpack.kernels.cpu`, C++ built on first use) when it
can, and otherwise the pure-torch reference in :mod:`kvpack.kernels.reference`, logging the reason once.

The backend is chosen by, innermost first: the context manager :func:`use`, the environment variable
``KVPACK_KERNELS``, else ``"auto"``:

* ``"auto"``: the fast kernel where it can run, else the reference (one logged warning per reason);
* ``"fast"``: the fast kernel or :class:`KernelUnavailableError` (nothing falls back silently);
* ``"reference"``: always the reference (the oracle the tests compare against).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator

from . import reference

__all__ = [
    "BACKENDS",
    "KernelUnavailableError",
    "backend",
    "use",
    "kivi_key_scores",
    "value_weighted_sum",
    "qjl_key_scores",
    "turbo_key_scores",
    "turbo_weighted_sum",
    "quantize_pack_tokens",
    "quantize_pack_key_groups",
    "pack_signs",
    "reference",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "fast", "reference")
_ENV = "KVPACK_KERNELS"
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvpack_kernels_backend", default=None)
_warned: set[tuple[str, str]] = set()


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
        from . import cpu

        reason = cpu.available()
        if reason:
            raise KernelUnavailableError(f"the fast kernel backend cannot run: {reason}")
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


def _fast(kernel: str, *args):
    """The fast implementation of ``kernel`` for these arguments, or ``None`` to run the reference."""
    name = backend()
    if name == "reference":
        return None
    from . import cpu

    reason = cpu.available() or cpu.unsupported(kernel, *args)  # raises for malformed arguments
    if reason is None:
        return cpu.IMPLEMENTATIONS[kernel]  # checked just now
    if name == "fast":
        raise KernelUnavailableError(f"{kernel}: the fast kernel backend was requested but cannot run: {reason}")
    if (kernel, reason) not in _warned:
        _warned.add((kernel, reason))
        logger.warning("%s runs the slow pure-torch reference kernel: %s", kernel, reason)
    return None


def kivi_key_scores(query, codes, scale, zero, bits):
    """See :func:`kvpack.kernels.reference.kivi_key_scores`."""
    fast = _fast("kivi_key_scores", query, codes, scale, zero, bits)
    if fast is not None:
        return fast(query, codes, scale, zero, bits)
    return reference.kivi_key_scores(query, codes, scale, zero, bits)


def value_weighted_sum(weights, codes, scale, zero, bits, group_size):
    """See :func:`kvpack.kernels.reference.value_weighted_sum`."""
    fast = _fast("value_weighted_sum", weights, codes, scale, zero, bits, group_size)
    if fast is not None:
        return fast(weights, codes, scale, zero, bits, group_size)
    return reference.value_weighted_sum(weights, codes, scale, zero, bits, group_size)


def qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
    """See :func:`kvpack.kernels.reference.qjl_key_scores`."""
    args = (query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms)
    fast = _fast("qjl_key_scores", *args)
    if fast is not None:
        return fast(*args)
    return reference.qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms)


def turbo_key_scores(query_rotated, codes, scale, codebook, bits):
    """See :func:`kvpack.kernels.reference.turbo_key_scores`."""
    fast = _fast("turbo_key_scores", query_rotated, codes, scale, codebook, bits)
    if fast is not None:
        return fast(query_rotated, codes, scale, codebook, bits)
    return reference.turbo_key_scores(query_rotated, codes, scale, codebook, bits)


def turbo_weighted_sum(weights, codes, scale, codebook, bits):
    """See :func:`kvpack.kernels.reference.turbo_weighted_sum`."""
    fast = _fast("turbo_weighted_sum", weights, codes, scale, codebook, bits)
    if fast is not None:
        return fast(weights, codes, scale, codebook, bits)
    return reference.turbo_weighted_sum(weights, codes, scale, codebook, bits)


def quantize_pack_tokens(values, bits, group_size, scale_dtype=None):
    """See :func:`kvpack.kernels.reference.quantize_pack_tokens` (the fast kernel is bit-identical)."""
    fast = _fast("quantize_pack_tokens", values, bits, group_size, scale_dtype)
    if fast is not None:
        return fast(values, bits, group_size, scale_dtype)
    return reference.quantize_pack_tokens(values, bits, group_size, scale_dtype)


def quantize_pack_key_groups(keys, bits, group_size, scale_dtype=None):
    """See :func:`kvpack.kernels.reference.quantize_pack_key_groups` (the fast kernel is bit-identical)."""
    fast = _fast("quantize_pack_key_groups", keys, bits, group_size, scale_dtype)
    if fast is not None:
        return fast(keys, bits, group_size, scale_dtype)
    return reference.quantize_pack_key_groups(keys, bits, group_size, scale_dtype)


def pack_signs(x):
    """See :func:`kvpack.kernels.reference.pack_signs` (the fast kernel is bit-identical)."""
    fast = _fast("pack_signs", x)
    if fast is not None:
        return fast(x)
    return reference.pack_signs(x)
