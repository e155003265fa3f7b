"""QJL's fused Triton decode kernel: score estimates from the sign bits, values as KIVI's.

The sketched query ``S q`` (B, H, M, m) is one matmul before the launch. A tile is one group of G tokens:
its k outlier channels give ``S q_out`` (k rank-1 updates of S's columns at those channels) and
``S q_in = S q - S q_out``; the scores are ``sqrt(pi/2)/m |k_in| <S q_in, sign(S k_in)>`` plus the outlier
term with ``S_o = S[:m_o]``, the sign bits unpacked to +-1 (m, G) for one product per part. Values use KIVI's
affine tiles (:func:`kvpack.methods.kivi.triton.affine_values`). Shared driver:
:mod:`kvpack.kernels.triton_decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels import triton_decode as driver
from ...kernels.checks import SCALE_TYPES, inner
from ..kivi.triton import affine_value_args, affine_values, affine_values_reason

__all__ = ["qjl_decode", "qjl_decode_reason"]


@triton.jit
def signs_pm(sg, at, sg_sg, oj, op, BITS: tl.constexpr):
    """Sign bits of a group's G tokens -> (BITS, G) float32 +-1 (bit p of a token: bit p % 8 of byte p // 8)."""
    byte = tl.load(sg + at + oj[None, :] * sg_sg + (op // 8)[:, None])
    return ((byte >> (op % 8).to(tl.uint8)[:, None]) & 1).to(tl.float32) * 2.0 - 1.0


@triton.jit
def _qjl_decode(
    q, q_sb, q_sh, q_sm, mask, m_sb, m_sh, m_sm,
    kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n, kf2, kf2_sb, kf2_sh, kf2_sl, kf2_n,
    vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n, vf2, vf2_sb, vf2_sh, vf2_sl, vf2_n,
    sq, sketch, oi, oi_sb, oi_sh, oi_sn, sg, sg_sb, sg_sh, sg_sn, sg_sg, nm, on, nm_sb, nm_sh, nm_sn,
    os, os_sb, os_sh, os_sn, os_sg,
    vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st,
    out, part_m, part_l, H, M, KQ, VQ, T, CHUNK, splits, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
    EMULATE: tl.constexpr, G: tl.constexpr, VB: tl.constexpr, MS: tl.constexpr, K: tl.constexpr,
    MO: tl.constexpr,
):  # fmt: skip
    bh, split, b, h, om, od, oj, start, end, m_i, l_i, acc = driver.program(H, T, CHUNK, BLOCK_M, D, G)
    op = tl.arange(0, MS)
    rows = om < M
    q_at = b * q_sb + h * q_sh + om * q_sm
    query = tl.load(q + q_at[:, None] + od[None, :], mask=rows[:, None], other=0.0)  # (BM, D)
    sketched = tl.load(sq + ((bh * M).to(tl.int64) + om)[:, None] * MS + op[None, :], mask=rows[:, None], other=0.0)
    for t0 in range(start, end, G):
        t = t0 + oj
        if t0 < KQ:  # KQ is a multiple of G: a tile is packed or fp as a whole on the key side
            n = t0 // G
            inliers = sketched
            if K > 0:
                outliers = tl.zeros([BLOCK_M, MO], tl.float32)  # S_o q_out
                oo = tl.arange(0, MO)
                for j in tl.static_range(K):
                    channel = tl.load(oi + b * oi_sb + h * oi_sh + n * oi_sn + j).to(tl.int32)
                    q_c = tl.load(q + q_at + channel, mask=rows, other=0.0)  # (BM,)
                    inliers -= q_c[:, None] * tl.load(sketch + op * D + channel)[None, :]
                    outliers += q_c[:, None] * tl.load(sketch + oo * D + channel)[None, :]
            at = b * sg_sb + h * sg_sh + n * sg_sn
            s = driver.dot(inliers, signs_pm(sg, at, sg_sg, oj, op, MS), DOT, EMULATE)  # (BM, G)
            norm_at = b * nm_sb + h * nm_sh + n * nm_sn + oj
            s = s * (tl.load(nm + norm_at).to(tl.float32) * (1.2533141373155003 / MS))[None, :]
            if K > 0:
                at = b * os_sb + h * os_sh + n * os_sn
                s_out = driver.dot(outliers, signs_pm(os, at, os_sg, oj, oo, MO), DOT, EMULATE)
                s += s_out * (tl.load(on + norm_at).to(tl.float32) * (1.2533141373155003 / MO))[None, :]
        else:
            keys = driver.fp_rows(kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n,
                                  kf2, kf2_sb, kf2_sh, kf2_sl, kf2_n, b, h, t - KQ, od)  # fmt: skip
            s = driver.dot(query, tl.trans(keys), 0, False)  # the residual: float32 products (a few tiles)
        if t0 + G <= VQ:
            values = affine_values(vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st, b, h, t, t < VQ, od, VB, G)
            m_i, l_i, acc = driver.attend_tile(
                s, values, m_i, l_i, acc, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK, DOT, EMULATE
            )
        else:  # the window: float32 products
            packed = affine_values(vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st, b, h, t, t < VQ, od, VB, G)
            fp = driver.fp_rows(vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n,
                                vf2, vf2_sb, vf2_sh, vf2_sl, vf2_n, b, h, t - VQ, od)  # fmt: skip
            values = tl.where((t < VQ)[:, None], packed, fp)
            m_i, l_i, acc = driver.attend_tile(
                s, values, m_i, l_i, acc, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK, 0, False
            )
    driver.finish(acc, m_i, l_i, out, part_m, part_l, bh, split, splits, om, od, M, D, SPLIT, HAS_MASK)


def _power_of_two(n: int) -> bool:
    return 16 <= n and not n & (n - 1)


def qjl_decode_reason(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms, key_rows, key_fp,
                      value_codes, value_scale, value_zero, value_rows, value_fp, mask, scale, value_bits,
                      group_size) -> str | None:  # fmt: skip
    """Why (well-formed: ``ops.qjl_decode``'s check ran) arguments cannot take :func:`qjl_decode`, or None."""
    tokens = value_rows + sum(v.shape[2] for v in value_fp)
    tensors = (sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms, value_codes, value_scale, value_zero,
               *key_fp, *value_fp)  # fmt: skip
    if reason := driver.reason(query, key_fp, value_fp, mask, group_size, tokens, tensors):
        return reason
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    if not _power_of_two(m) or (k and not _power_of_two(m_o)):
        return f"sketch sizes m={m}, m_o={m_o} (the Triton kernel takes powers of 2 from 16)"
    if signs.dtype != torch.uint8 or outlier_signs.dtype != torch.uint8 or sketch.dtype != torch.float32:
        return "signs that are not uint8 or a sketch that is not float32"
    if norms.dtype not in SCALE_TYPES or outlier_norms.dtype not in SCALE_TYPES:
        return f"norm dtypes {norms.dtype}/{outlier_norms.dtype}"
    if outlier_idx.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        return f"outlier_idx dtype {outlier_idx.dtype}"
    return affine_values_reason(value_codes, value_scale, value_zero, value_bits)


def qjl_decode(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms, key_rows, key_fp, value_codes,
               value_scale, value_zero, value_rows, value_fp, mask, scale, value_bits, group_size):  # fmt: skip
    """``ops.qjl_decode`` in one Triton launch (plus the split merge and the query's sketch); arguments as there."""
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    query = query.contiguous()
    sketch = sketch.contiguous()
    sketched = query @ sketch.T  # (B, H, M, m) = S q
    signs, outlier_signs = inner(signs, 1), inner(outlier_signs, 1)
    if not (norms.stride(-1) == 1 and norms.stride() == outlier_norms.stride()):
        norms, outlier_norms = norms.contiguous(), outlier_norms.contiguous()
    if outlier_idx.numel() and outlier_idx.stride(-1) != 1:
        outlier_idx = outlier_idx.contiguous()
    if not k:  # nothing is read of the outlier tensors: pass well-formed stand-ins
        outlier_idx, outlier_signs, outlier_norms = signs, signs, norms
    keys = [sketched, sketch, outlier_idx, *outlier_idx.stride()[:3], signs, *signs.stride()[:4], norms, outlier_norms,
            *norms.stride()[:3], outlier_signs, *outlier_signs.stride()[:4]]  # fmt: skip
    values = affine_value_args(value_codes, value_scale, value_zero)
    return driver.launch(_qjl_decode, query, mask, key_fp, value_fp, key_rows * group_size, value_rows, scale,
                         keys + values, group_size, G=group_size, VB=value_bits, MS=m, K=k, MO=m_o if k else 16)  # fmt: skip
