"""Helpers for the per-kernel checks in each method's ``cpu.py`` (what the C++ trusts, checked in Python).

A check raises ``TypeError``/``ValueError`` for inputs no backend can take (wrong types, ranks or shapes that
disagree: the C++ would read outside the buffers), and returns a reason string for well-formed inputs that
only the reference takes (another device or dtype); None means the fast kernel may run. Sizes the C++
keeps in 32-bit ints are bounded; index tensors the C++ dereferences are range-checked by the C++ itself.
"""

from __future__ import annotations

import torch

__all__ = ["SCALE_TYPES", "bits_in", "codes_reason", "not_cpu", "same", "scale_reason", "small", "tensor", "tensors"]

#: Storage dtypes the kernels read for scales, zeros and norms, and their codes in the argument structs.
SCALE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_INT32 = 2**31 - 1
_STRIDED = torch.strided


def tensors(**named) -> None:
    """Each ``name=(tensor, rank)`` is a dense torch.Tensor of that rank."""
    for name, (x, rank) in named.items():
        tensor(name, x, rank)


def tensor(name: str, x, rank: int) -> None:
    """``x`` is a dense torch.Tensor of ``rank`` dimensions (the hot path's form of :func:`tensors`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout is not _STRIDED:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")


def same(name: str, got, want, what: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{name} {what} {tuple(got)} do not match the expected {tuple(want)}")


def bits_in(bits, allowed: tuple) -> None:
    if type(bits) is not int or bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


def small(names: tuple[str, ...], *sizes: int) -> None:
    """Raise ``ValueError`` for a size the C++ keeps in a 32-bit int that exceeds it (``names[i]`` names
    ``sizes[i]``). Positional, with a constant tuple of names: it runs on every kernel call."""
    if max(sizes) > _INT32:
        name, value = next((n, v) for n, v in zip(names, sizes) if v > _INT32)
        raise ValueError(f"{name} = {value} exceeds the kernels' 32-bit limit")


def not_cpu(*xs) -> str | None:
    for t in xs:
        if not t.is_cpu:
            return f"device {t.device.type} (fast kernels run on CPU)"
    return None


def scale_reason(scale, zero=None, what="scale/zero") -> str | None:
    if scale.dtype not in SCALE_TYPES or (zero is not None and zero.dtype != scale.dtype):
        dtypes = scale.dtype if zero is None else f"{scale.dtype}/{zero.dtype}"
        return f"{what} dtypes {dtypes} (fast kernels take float32, float16, bfloat16)"
    return None


def codes_reason(codes) -> str | None:
    return None if codes.dtype == torch.uint8 else f"codes dtype {codes.dtype} (expected uint8)"


def inner_contiguous(t: torch.Tensor, dims: int) -> bool:
    """The last ``dims`` axes are laid out contiguously (C order)."""
    if t.is_contiguous():  # the hot path: the stores' buffers are
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape[-dims:]), reversed(t.stride()[-dims:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def inner(t: torch.Tensor, dims: int) -> torch.Tensor:
    """``t``, or a contiguous copy unless its last ``dims`` axes already are (the hot path: a contiguous
    tensor returns at once)."""
    return t if inner_contiguous(t, dims) else t.contiguous()
