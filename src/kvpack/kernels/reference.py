"""Pure-torch reference kernels: the oracle every fast kernel is tested against.

Shapes use B = batch, H = kv heads, M = query rows per kv head (GQA group x query tokens),
N = quantized groups, G = group size, D = head_dim, T = tokens.
"""

from __future__ import annotations

import math

import torch

from ..primitives import dequantize_affine, pack_bits, quantize_affine, unpack_bits

__all__ = [
    "kivi_key_scores",
    "qjl_key_scores",
    "value_weighted_sum",
    "turbo_key_scores",
    "turbo_weighted_sum",
    "quantize_pack_tokens",
    "quantize_pack_key_groups",
    "pack_signs",
]


def kivi_key_scores(
    query: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """q.k over per-channel quantized key groups.

    Args:
        query: (B, H, M, D) float32.
        codes: (B, H, N, D, G * bits / 8) uint8, tokens packed LSB-first along the last axis.
        scale, zero: (B, H, N, D).
        bits: code width.

    Returns:
        (B, H, M, N * G) float32.
    """
    group = codes.shape[-1] * 8 // bits
    keys = unpack_bits(codes, bits, group).float()  # (B, H, N, D, G)
    keys = keys * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    scores = torch.einsum("bhmd,bhndg->bhmng", query, keys)  # (B, H, M, N, G)
    return scores.reshape(*scores.shape[:3], -1)


def value_weighted_sum(
    weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """sum_t weights[t] * v_hat[t] over per-token quantized values.

    Args:
        weights: (B, H, M, T) float32.
        codes: (B, H, T, D * bits / 8) uint8, channels packed LSB-first.
        scale, zero: (B, H, T, D / G).
        bits, group_size: code width and channels per group.

    Returns:
        (B, H, M, D) float32.
    """
    dim = scale.shape[-1] * group_size
    values = dequantize_affine(unpack_bits(codes, bits, dim), scale, zero, group_size, -1)  # (B, H, T, D)
    return weights @ values


def qjl_key_scores(
    query: torch.Tensor,
    sketch: torch.Tensor,
    outlier_idx: torch.Tensor,
    signs: torch.Tensor,
    norms: torch.Tensor,
    outlier_signs: torch.Tensor,
    outlier_norms: torch.Tensor,
) -> torch.Tensor:
    """QJL score estimates over sketched key groups (arXiv 2406.03482).

    For a key split by its group's outlier channels into ``k_in`` + ``k_out`` (and ``q`` likewise)::

        score = sqrt(pi/2)/m   * |k_in|  * <S q_in,    sign(S k_in)>
              + sqrt(pi/2)/m_o * |k_out| * <S_o q_out, sign(S_o k_out)>,   S_o = S[:m_o]

    Args:
        query: (B, H, M, D) float32.
        sketch: S, (m, D) float32.
        outlier_idx: (B, H, N, k) integer channel indices of each group's outliers (k may be 0).
        signs: (B, H, N, G, m / 8) uint8, bit p of the sketch in bit p % 8 of byte p // 8, 1 iff positive.
        norms: (B, H, N, G) norms of ``k_in``.
        outlier_signs: (B, H, N, G, m_o / 8) uint8; outlier_norms: (B, H, N, G) norms of ``k_out``.

    Returns:
        (B, H, M, N * G) float32.
    """
    batch, heads, rows, dim = query.shape
    n_groups, group = signs.shape[2], signs.shape[3]
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    sketched = query @ sketch.T  # (B, H, M, m) = S q
    sketched_in = sketched.unsqueeze(3)  # (B, H, M, 1, m), broadcast over groups
    scores = torch.zeros(batch, heads, rows, n_groups, group, device=query.device)
    if k:
        idx = outlier_idx.long()  # (B, H, N, k)
        q_out = torch.gather(
            query.unsqueeze(3).expand(-1, -1, -1, n_groups, -1), -1, idx.unsqueeze(2).expand(-1, -1, rows, -1, -1)
        )  # (B, H, M, N, k)
        columns = sketch[:, idx].permute(1, 2, 3, 4, 0)  # (B, H, N, k, m): the columns of S at the outliers
        sketched_out = torch.einsum("bhmnk,bhnkp->bhmnp", q_out, columns)  # (B, H, M, N, m) = S q_out
        sketched_in = sketched_in - sketched_out  # S q_in = S q - S q_out
        if m_o:
            sign_out = unpack_bits(outlier_signs, 1, m_o).float() * 2 - 1  # (B, H, N, G, m_o)
            dot_out = torch.einsum("bhmnp,bhngp->bhmng", sketched_out[..., :m_o], sign_out)
            scores += dot_out * (math.sqrt(math.pi / 2) / m_o) * outlier_norms.float().unsqueeze(2)
    sign_in = unpack_bits(signs, 1, m).float() * 2 - 1  # (B, H, N, G, m)
    dot_in = torch.einsum("bhmnp,bhngp->bhmng", sketched_in.expand(-1, -1, -1, n_groups, -1), sign_in)
    scores += dot_in * (math.sqrt(math.pi / 2) / m) * norms.float().unsqueeze(2)
    return scores.reshape(batch, heads, rows, n_groups * group)


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


def quantize_pack_tokens(
    values: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token min-max quantization in groups of ``group_size`` channels, codes packed along channels.

    Args:
        values: (B, H, T, D) floating.
        bits, group_size: code width and channels per group (must divide D).
        scale_dtype: storage dtype of scale/zero (default: ``values.dtype``).

    Returns:
        ``codes`` (B, H, T, ceil(D * bits / 8)) uint8, ``scale`` and ``zero`` (B, H, T, D / G).

    Raises:
        ValueError: as :func:`kvpack.primitives.quantize_affine`.
    """
    codes, scale, zero = quantize_affine(values, bits, group_size, -1, scale_dtype)
    return pack_bits(codes, bits, dim=-1), scale, zero


def quantize_pack_key_groups(
    keys: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel min-max quantization over groups of ``group_size`` tokens (KIVI keys), codes packed
    along the group's tokens.

    Args:
        keys: (B, H, N * G, D) floating, G = ``group_size``.
        bits: code width.
        scale_dtype: storage dtype of scale/zero (default: ``keys.dtype``).

    Returns:
        ``codes`` (B, H, N, D, ceil(G * bits / 8)) uint8, ``scale`` and ``zero`` (B, H, N, D).

    Raises:
        ValueError: as :func:`kvpack.primitives.quantize_affine`, or a token count not a multiple of G.
    """
    batch, heads, tokens, dim = keys.shape
    if group_size <= 0 or tokens % group_size:
        raise ValueError(f"the token count ({tokens}) must be a multiple of group_size ({group_size})")
    grouped = keys.reshape(batch, heads, tokens // group_size, group_size, dim)
    grouped = grouped.transpose(-1, -2)  # (B, H, N, D, G): a channel's G tokens are contiguous
    codes, scale, zero = quantize_affine(grouped, bits, group_size, -1, scale_dtype)
    return pack_bits(codes, bits, dim=-1), scale.squeeze(-1), zero.squeeze(-1)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """QJL sign bits: ``x`` (..., m) float32 -> (..., ceil(m / 8)) uint8, bit p % 8 of byte p // 8 set iff
    ``x[..., p] > 0`` (so 0 and NaN give 0)."""
    return pack_bits((x > 0).to(torch.uint8), 1, dim=-1)
