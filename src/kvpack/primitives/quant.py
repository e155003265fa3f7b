"""Asymmetric min-max (affine) group quantization: the reference every kernel is checked against.

For a group ``x`` of ``group_size`` consecutive elements along one axis::

    zero  = min(x)
    scale = (max(x) - min(x)) / (2**bits - 1)
    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)      (code = 0 where scale == 0)
    x_hat = code * scale + zero

``scale`` and ``zero`` are first rounded to the storage dtype and the codes are computed from the rounded
values, so ``x_hat`` is exactly what a kernel reading the stored tensors reconstructs. Arithmetic runs in
float32 whatever the input dtype. A constant group reconstructs to its (stored) value and never gives NaN.
"""

from __future__ import annotations

import torch

__all__ = ["QUANT_BITS", "quantize_affine", "dequantize_affine"]

QUANT_BITS = (1, 2, 4, 8)


def _grouped(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """Move ``dim`` last and split it into (n_groups, group_size)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    if group_size <= 0 or n % group_size:
        raise ValueError(f"group_size must divide the quantized axis ({n}), got {group_size}")
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def quantize_affine(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    dim: int = -1,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` in groups of ``group_size`` consecutive elements along ``dim``.

    Args:
        x: floating tensor.
        bits: code width, one of 1, 2, 4, 8.
        group_size: elements per group; must divide ``x.shape[dim]``.
        dim: the grouped axis.
        scale_dtype: dtype in which scale and zero are stored (default: ``x.dtype``).

    Returns:
        ``codes`` (uint8, shape of ``x``, values in ``[0, 2**bits)``), and ``scale`` and ``zero``
        (``scale_dtype``, shape of ``x`` with ``dim`` replaced by ``x.shape[dim] // group_size``).

    Raises:
        ValueError: unsupported bits, a group size that does not divide the axis, or a scale/zero that
            overflows ``scale_dtype`` (it would otherwise become inf and corrupt the group).
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits!r}")
    if not x.is_floating_point():
        raise TypeError(f"quantize_affine expects a floating tensor, got {x.dtype}")
    scale_dtype = scale_dtype or x.dtype
    groups = _grouped(x, group_size, dim).float()  # (..., n_groups, G)
    lo = groups.amin(dim=-1)
    hi = groups.amax(dim=-1)
    zero = lo.to(scale_dtype)
    scale = ((hi - lo) / (2**bits - 1)).to(scale_dtype)
    if not bool(torch.isfinite(zero).all() & torch.isfinite(scale).all()):  # one host read
        raise ValueError(
            f"quantization scale or zero overflows {scale_dtype} (inputs range up to "
            f"{groups.abs().max().item():.3g}); store scales in a wider dtype, e.g. scale_dtype=torch.float32"
        )
    zero32 = zero.float().unsqueeze(-1)
    scale32 = scale.float().unsqueeze(-1)
    safe_scale = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    codes = torch.round((groups - zero32) / safe_scale).clamp_(0, 2**bits - 1)
    codes = torch.where(scale32 > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    codes = codes.reshape(*codes.shape[:-2], codes.shape[-2] * codes.shape[-1]).movedim(-1, dim)
    return codes, scale.movedim(-1, dim), zero.movedim(-1, dim)


def dequantize_affine(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dim: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct ``codes * scale + zero`` (computed in float32), groups along ``dim``.

    Args:
        codes: uint8 codes, any shape.
        scale, zero: shape of ``codes`` with ``dim`` replaced by ``codes.shape[dim] // group_size``.
        group_size: elements per group.
        dim: the grouped axis.
        dtype: output dtype.
    """
    groups = _grouped(codes, group_size, dim).float()  # (..., n_groups, G)
    x = groups * scale.movedim(dim, -1).float().unsqueeze(-1) + zero.movedim(dim, -1).float().unsqueeze(-1)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1]).movedim(-1, dim).to(dtype)


def random_rotation(dim: int, seed: int, layer_idx: int) -> torch.Tensor:
    """A Haar-random orthogonal (dim, dim) float32 matrix, reproducible from (seed, layer_idx, dim)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + layer_idx * 7919 + dim) % 2**63)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix makes the QR unique (Haar measure)
