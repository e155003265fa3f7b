"""KIVI's reference kernels, pure torch: the oracle every fast kernel (CPU, GPU) is tested against.

Shapes use B = batch, H = kv heads, M = query rows per kv head (GQA group x query tokens),
N = quantized groups, G = group size, D = head_dim, T = tokens.
"""

from __future__ import annotations

import torch

from ...primitives import dequantize_affine, pack_bits, quantize_affine, unpack_bits

__all__ = ["kivi_key_scores", "quantize_pack_key_groups", "quantize_pack_tokens", "value_weighted_sum"]


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
    return scores.reshape(*scores.shape[:3], scores.shape[3] * scores.shape[4])  # explicit: empty axes too


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
