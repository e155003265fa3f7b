"""QJL's reference kernels, pure torch: the oracle the fast kernels are tested against (shapes as in
:mod:`kvpack.methods.kivi.reference`)."""

from __future__ import annotations

import math

import torch

from ...primitives import pack_bits, unpack_bits

__all__ = ["pack_signs", "qjl_key_scores"]


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


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """QJL sign bits: ``x`` (..., m) float32 -> (..., ceil(m / 8)) uint8, bit p % 8 of byte p // 8 set iff
    ``x[..., p] > 0`` (so 0 and NaN give 0)."""
    return pack_bits((x > 0).to(torch.uint8), 1, dim=-1)
