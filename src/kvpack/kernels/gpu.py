"""Whether the Triton kernels can run, without importing Triton until asked (``import kvpack`` never does).

The kernels themselves live beside their methods (``methods/<name>/triton.py``) and share the decode driver
of :mod:`kvpack.kernels.triton_decode`; :class:`kvpack.kernels.Kernel` reaches them for CUDA tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["available", "device_reason", "interpreting"]


@functools.cache
def _import_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'kvpack[gpu]')"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install: say what it was, once
        return f"triton failed to import: {type(err).__name__}: {err}"
    return None


def available() -> str | None:
    """Why the Triton kernels cannot run in this process, or None."""
    return _import_reason()


def interpreting() -> bool:
    """Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``, read when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reason(device) -> str | None:
    """Why tensors on ``device`` cannot take a Triton kernel (CUDA, or the CPU under the interpreter), or None."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"device {device.type} (the Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"
