"""Turbo's fused Triton decode kernel: scores and P.V in the rotated bases, straight from the packed codes.

The query is rotated once per step (``q @ R_k^T``, one matmul before the launch); a packed key tile is
``scale_t * codebook[codes]`` (a gather from the 2**bits centroids) against that rotated query, an fp key
against the plain query. P.V accumulates in the value rotation's basis: packed values as they are, the fp
window rotated before the launch (``v @ R_v^T``: at most 2R tokens, one small matmul, so the kernel holds no
(D, D) tile), and the result is rotated back once (``@ R_v``) after the merge. Shared driver: :mod:`kvpack.kernels.triton_decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels import triton_decode as driver
from ...kernels.checks import SCALE_TYPES, inner

__all__ = ["turbo_decode", "turbo_decode_reason"]

_BITS = (1, 2, 4, 8)


@triton.jit
def codebook_rows(c, c_sb, c_sh, c_st, sc, s_sb, s_sh, s_st, book, b, h, t, valid, od, BITS: tl.constexpr):
    """Per-token codebook rows at tokens ``t`` (BN,) -> (BN, D) float32 in the rotated basis, 0 where not
    ``valid``."""
    byte = tl.load(c + b * c_sb + h * c_sh + t[:, None] * c_st + (od * BITS // 8)[None, :], mask=valid[:, None],
                   other=0)  # fmt: skip
    code = (byte >> ((od * BITS) % 8).to(tl.uint8)[None, :]) & ((1 << BITS) - 1)
    centroid = tl.load(book + code.to(tl.int32))
    scale = tl.load(sc + b * s_sb + h * s_sh + t * s_st, mask=valid, other=0.0).to(tl.float32)
    return centroid * scale[:, None]


@triton.jit
def _turbo_decode(
    q, q_sb, q_sh, q_sm, mask, m_sb, m_sh, m_sm,
    kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n, kf2, kf2_sb, kf2_sh, kf2_sl, kf2_n,
    vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n, vf2, vf2_sb, vf2_sh, vf2_sl, vf2_n,
    qr, kc, kc_sb, kc_sh, kc_st, ks, ks_sb, ks_sh, ks_st, kbook,
    vc, vc_sb, vc_sh, vc_st, vs, vs_sb, vs_sh, vs_st, vbook,
    out, part_m, part_l, H, M, KQ, VQ, T, CHUNK, splits, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
    EMULATE: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
):  # fmt: skip
    bh, split, b, h, om, od, oj, start, end, m_i, l_i, acc = driver.program(H, T, CHUNK, BLOCK_M, D, G)
    at = b * q_sb + h * q_sh + om[:, None] * q_sm + od[None, :]
    query = tl.load(q + at, mask=(om < M)[:, None], other=0.0)  # (BM, D)
    rotated = tl.load(qr + at, mask=(om < M)[:, None], other=0.0)  # (BM, D) = q R_k^T, the query's strides
    both = tl.minimum(KQ, VQ)
    for t0 in range(start, end, G):
        t = t0 + oj
        if t0 + G <= both:  # packed keys and values
            keys = codebook_rows(kc, kc_sb, kc_sh, kc_st, ks, ks_sb, ks_sh, ks_st, kbook, b, h, t, t < KQ, od, KB)
            s = driver.dot(rotated, tl.trans(keys), DOT, EMULATE)
            values = codebook_rows(vc, vc_sb, vc_sh, vc_st, vs, vs_sb, vs_sh, vs_st, vbook, b, h, t, t < VQ, od, VB)
            m_i, l_i, acc = driver.attend_tile(
                s, values, m_i, l_i, acc, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK, DOT, EMULATE
            )
        else:  # the tail: float32 products (a few tiles)
            if t0 < KQ:  # KQ is a multiple of G: a tile is packed or fp as a whole on the key side
                keys = codebook_rows(kc, kc_sb, kc_sh, kc_st, ks, ks_sb, ks_sh, ks_st, kbook, b, h, t, t < KQ, od,
                                     KB)  # fmt: skip
                s = driver.dot(rotated, tl.trans(keys), 0, False)
            else:
                keys = driver.fp_rows(kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n,
                                      kf2, kf2_sb, kf2_sh, kf2_sl, kf2_n, b, h, t - KQ, od)  # fmt: skip
                s = driver.dot(query, tl.trans(keys), 0, False)
            packed = codebook_rows(vc, vc_sb, vc_sh, vc_st, vs, vs_sb, vs_sh, vs_st, vbook, b, h, t, t < VQ, od, VB)
            fp = driver.fp_rows(vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n,
                                vf2, vf2_sb, vf2_sh, vf2_sl, vf2_n, b, h, t - VQ, od)  # fmt: skip
            values = tl.where((t < VQ)[:, None], packed, fp)
            m_i, l_i, acc = driver.attend_tile(
                s, values, m_i, l_i, acc, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK, 0, False
            )
    driver.finish(acc, m_i, l_i, out, part_m, part_l, bh, split, splits, om, od, M, D, SPLIT, HAS_MASK)


def turbo_decode_reason(query, key_codes, key_scale, key_rotation, key_codebook, key_rows, key_fp, value_codes,
                        value_scale, value_rotation, value_codebook, value_rows, value_fp, mask, scale, key_bits,
                        value_bits) -> str | None:  # fmt: skip
    """Why (well-formed: ``ops.turbo_decode``'s check ran) arguments cannot take :func:`turbo_decode`, or None."""
    tokens = value_rows + sum(v.shape[2] for v in value_fp)
    tensors = (key_codes, key_scale, key_rotation, key_codebook, value_codes, value_scale, value_rotation,
               value_codebook, *key_fp, *value_fp)  # fmt: skip
    if reason := driver.reason(query, key_fp, value_fp, mask, key_codes.shape[3], tokens, tensors):
        return reason
    if key_bits not in _BITS or value_bits not in _BITS:
        return f"bits {key_bits}/{value_bits} (the Triton kernel takes {_BITS})"
    if key_codes.dtype != torch.uint8 or value_codes.dtype != torch.uint8:
        return "codes that are not uint8"
    if key_scale.dtype not in SCALE_TYPES or value_scale.dtype not in SCALE_TYPES:
        return f"scale dtypes {key_scale.dtype}/{value_scale.dtype}"
    if any(x.dtype != torch.float32 for x in (key_rotation, key_codebook, value_rotation, value_codebook)):
        return "rotations or codebooks that are not float32"
    return None


def turbo_decode(query, key_codes, key_scale, key_rotation, key_codebook, key_rows, key_fp, value_codes, value_scale,
                 value_rotation, value_codebook, value_rows, value_fp, mask, scale, key_bits, value_bits):  # fmt: skip
    """``ops.turbo_decode`` in one Triton launch (plus the split merge and two small matmuls: the query
    rotated in, the result rotated back); arguments as there."""
    group = key_codes.shape[3]
    query = query.contiguous()
    rotated = query @ key_rotation.T  # (B, H, M, D), the query's (contiguous) strides
    kc = inner(key_codes, 1).flatten(2, 3)  # (B, H, N * G, D * bits / 8): per token, a view of the rows
    ks = key_scale.flatten(2, 3)
    vc = inner(value_codes, 1)
    keys = [rotated, kc, *kc.stride()[:3], ks, *ks.stride()[:3], key_codebook.contiguous()]
    values = [vc, *vc.stride()[:3], value_scale, *value_scale.stride()[:3], value_codebook.contiguous()]
    dot = driver.dot_type(key_fp, value_fp)  # the model dtype's products, before the window turns float32
    rotated_fp = [v.float() @ value_rotation.T for v in value_fp]  # (B, H, L, D): the window in the rotated basis
    out = driver.launch(_turbo_decode, query, mask, key_fp, rotated_fp, key_rows * group, value_rows, scale,
                        keys + values, group, dot=dot, G=group, KB=key_bits, VB=value_bits)  # fmt: skip
    return out @ value_rotation
