"""Turbo's reference kernels, pure torch: the oracle the fast kernels are tested against (shapes as in
:mod:`kvpack.methods.kivi.reference`)."""

from __future__ import annotations

import torch

from ...primitives import unpack_bits

__all__ = ["turbo_key_scores", "turbo_weighted_sum"]


def turbo_key_scores(
    query_rotated: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor, bits: int
) -> torch.Tensor:
    """q.k over per-token rotated codebook keys (:mod:`kvpack.methods.turbo`), in the rotated basis.

    ``score[t] = scale_t * sum_d q_d * codebook[code_{t,d}]``.

    Args:
        query_rotated: (B, H, M, D) float32, the query times the rotation (``query @ R.T``).
        codes: (B, H, T, D * bits / 8) uint8, channels packed LSB-first.
        scale: (B, H, T) per-token scales (float16, bfloat16 or float32).
        codebook: (2**bits,) float32 centroids (already divided by sqrt(D)).
        bits: code width, one of (1, 2, 4, 8).

    Returns:
        (B, H, M, T) float32.
    """
    keys = codebook[unpack_bits(codes, bits, query_rotated.shape[-1]).long()]  # (B, H, T, D)
    keys = keys * scale.float().unsqueeze(-1)
    return query_rotated @ keys.transpose(-1, -2)


def turbo_weighted_sum(
    weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor, bits: int
) -> torch.Tensor:
    """sum_t weights[t] * v_rot[t] over per-token rotated codebook values, in the rotated basis.

    ``out[r, d] = sum_t weights[r, t] * scale_t * codebook[code_{t,d}]`` (the caller rotates back once).

    Args:
        weights: (B, H, M, T) float32.
        codes: (B, H, T, D * bits / 8) uint8, channels packed LSB-first.
        scale: (B, H, T) per-token scales (float16, bfloat16 or float32).
        codebook: (2**bits,) float32 centroids (already divided by sqrt(D)).
        bits: code width, one of (1, 2, 4, 8).

    Returns:
        (B, H, M, D) float32.
    """
    values = codebook[unpack_bits(codes, bits).long()] * scale.float().unsqueeze(-1)  # (B, H, T, D)
    return weights @ values
