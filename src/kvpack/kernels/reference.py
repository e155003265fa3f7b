"""Pure-torch reference kernels: the oracle every fast kernel is tested against.

Shapes use B = batch, H = kv heads, M = query rows per kv head (GQA group x query tokens),
N = quantized groups, G = group size, D = head_dim, T = tokens.
"""

from __future__ import annotations

import torch

from ..primitives import dequantize_affine, unpack_bits

__all__ = ["kivi_key_scores", "value_weighted_sum"]


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
