"""Bit packing of low-bit integer codes into bytes.

Layout (shared by every kernel): codes are packed LSB-first along one axis, ``8 // bits`` codes per
uint8 word; code ``j`` of a word occupies bits ``[bits * j, bits * (j + 1))``. An axis whose length is
not a multiple of ``8 // bits`` is zero-padded; :func:`unpack_bits` takes the true length back.
"""

from __future__ import annotations

import torch

__all__ = ["PACK_BITS", "pack_bits", "unpack_bits", "packed_length"]

PACK_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")


def packed_length(length: int, bits: int) -> int:
    """Number of uint8 words that hold ``length`` codes of ``bits`` bits."""
    _check_bits(bits)
    per_byte = 8 // bits
    return (length + per_byte - 1) // per_byte


def pack_bits(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into uint8 along ``dim``.

    Args:
        codes: integer tensor (any integer dtype) whose values fit in ``bits`` bits.
        bits: 1, 2, 4 or 8.
        dim: the axis to pack along.

    Returns:
        uint8 tensor, same shape except ``dim`` becomes ``ceil(n * bits / 8)``.

    Raises:
        ValueError: unsupported ``bits``.
        TypeError: ``codes`` is not an integer tensor.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"pack_bits expects an integer tensor, got {codes.dtype}")
    codes = codes.to(torch.uint8).movedim(dim, -1)
    if bits == 8:
        return codes.contiguous().movedim(-1, dim)
    per_byte = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)  # (..., n_words, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per_byte,)
    words = (codes << shifts).sum(dim=-1, dtype=torch.uint8)  # bit fields are disjoint: sum == or
    return words.movedim(-1, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, length: int | None = None, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 words -> uint8 codes along ``dim``.

    Args:
        packed: uint8 tensor produced by :func:`pack_bits`.
        bits: the width the codes were packed with.
        length: the true number of codes along ``dim`` (drops padding); default: all.
        dim: the packed axis.

    Returns:
        uint8 tensor of codes, ``dim`` of size ``length``.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8 words, got {packed.dtype}")
    words = packed.movedim(dim, -1)
    if bits == 8:
        codes = words
    else:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per_byte,)
        mask = (1 << bits) - 1
        codes = (words.unsqueeze(-1) >> shifts) & mask  # (..., n_words, per_byte)
        codes = codes.reshape(*words.shape[:-1], words.shape[-1] * (8 // bits))  # explicit: empty axes too
    if length is not None:
        if length > codes.shape[-1]:
            raise ValueError(f"length {length} exceeds the {codes.shape[-1]} codes held")
        codes = codes[..., :length]
    return codes.movedim(-1, dim)
