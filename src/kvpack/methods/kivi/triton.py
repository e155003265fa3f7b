"""KIVI's fused Triton decode kernel (and the affine value tiles QJL's kernel shares).

One tile is one key group of G tokens: its codes (D, G * bits / 8) are unpacked once into (D, G) keys for
all the query rows of the kv head; the values of the same G tokens are unpacked per token (codes along the
channels, one scale/zero per G channels). Tiles wholly inside the packed part of both keys and values take
the packed path only; the rest (the just-flushed block, the residual, the window) read the fp tokens where
the packed rows end. Shared driver: :mod:`kvpack.kernels.triton_decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels import triton_decode as driver
from ...kernels.checks import SCALE_TYPES, inner

__all__ = ["kivi_decode", "kivi_decode_reason"]

_BITS = (2, 4, 8)


@triton.jit
def key_group(kc, kc_sb, kc_sh, kc_sn, kc_sd, ks, kz, ks_sb, ks_sh, ks_sn, b, h, n, od, oj, KB: tl.constexpr):
    """Key group ``n`` dequantized, transposed: (D, G) float32 (channel d's G tokens, LSB-first codes)."""
    byte = tl.load(kc + b * kc_sb + h * kc_sh + n * kc_sn + od[:, None] * kc_sd + (oj * KB // 8)[None, :])
    code = (byte >> ((oj * KB) % 8).to(tl.uint8)[None, :]) & ((1 << KB) - 1)
    at = b * ks_sb + h * ks_sh + n * ks_sn + od
    scale = tl.load(ks + at).to(tl.float32)
    zero = tl.load(kz + at).to(tl.float32)
    return code.to(tl.float32) * scale[:, None] + zero[:, None]


@triton.jit
def affine_values(vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st, b, h, t, valid, od, VB: tl.constexpr,
                  G: tl.constexpr):  # fmt: skip
    """Per-token affine values at tokens ``t`` (BN,) -> (BN, D) float32, 0 where not ``valid``."""
    byte = tl.load(vc + b * vc_sb + h * vc_sh + t[:, None] * vc_st + (od * VB // 8)[None, :], mask=valid[:, None],
                   other=0)  # fmt: skip
    code = (byte >> ((od * VB) % 8).to(tl.uint8)[None, :]) & ((1 << VB) - 1)
    at = b * vs_sb + h * vs_sh + t[:, None] * vs_st + (od // G)[None, :]
    scale = tl.load(vs + at, mask=valid[:, None], other=0.0).to(tl.float32)
    zero = tl.load(vz + at, mask=valid[:, None], other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def _kivi_decode(
    q, q_sb, q_sh, q_sm, mask, m_sb, m_sh, m_sm,
    kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n,
    vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n,
    kc, kc_sb, kc_sh, kc_sn, kc_sd, ks, kz, ks_sb, ks_sh, ks_sn,
    vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st,
    out, part_m, part_l, H, M, KQ, VQ, T, CHUNK, splits, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
    EMULATE: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    om = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    od = tl.arange(0, D)
    oj = tl.arange(0, G)
    query = tl.load(q + b * q_sb + h * q_sh + om[:, None] * q_sm + od[None, :], mask=(om < M)[:, None], other=0.0)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, T)
    both = tl.minimum(KQ, VQ)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for t0 in range(start, end, G):
        t = t0 + oj
        if t0 + G <= both:  # packed keys and values
            keys = key_group(kc, kc_sb, kc_sh, kc_sn, kc_sd, ks, kz, ks_sb, ks_sh, ks_sn, b, h, t0 // G, od, oj, KB)
            values = affine_values(vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st, b, h, t, t < VQ, od, VB, G)
            s = driver.dot(query, keys, DOT, EMULATE)
            m_i, l_i, acc = driver.attend_tile(
                s, values, m_i, l_i, acc, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK, DOT, EMULATE
            )
        else:  # the tail: float32 products (a few tiles)
            if t0 < KQ:  # KQ is a multiple of G: a tile is packed or fp as a whole on the key side
                keys = key_group(kc, kc_sb, kc_sh, kc_sn, kc_sd, ks, kz, ks_sb, ks_sh, ks_sn, b, h, t0 // G, od, oj,
                                 KB)  # fmt: skip
            else:
                keys = tl.trans(driver.fp_rows(kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n, b, h,
                                        t - KQ, od))  # fmt: skip
            packed = affine_values(vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st, b, h, t, t < VQ, od, VB, G)
            fp = driver.fp_rows(
                vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n, b, h, t - VQ, od
            )
            values = tl.where((t < VQ)[:, None], packed, fp)
            s = driver.dot(query, keys, 0, False)
            m_i, l_i, acc = driver.attend_tile(
                s, values, m_i, l_i, acc, mask, m_sb, m_sh, m_sm, b, h, om, M, t, end, scale2, HAS_MASK, 0, False
            )
    driver.finish(acc, m_i, l_i, out, part_m, part_l, bh, split, splits, om, od, M, D, SPLIT, HAS_MASK)


def affine_value_args(value_codes, value_scale, value_zero) -> list:
    """The value rows as a kernel's arguments (last axis contiguous; scale and zero with one stride set)."""
    value_codes = inner(value_codes, 1)
    if not (value_scale.stride(-1) == 1 and value_scale.stride() == value_zero.stride()):
        value_scale, value_zero = value_scale.contiguous(), value_zero.contiguous()
    return [value_codes, *value_codes.stride()[:3], value_scale, value_zero, *value_scale.stride()[:3]]


def affine_values_reason(value_codes, value_scale, value_zero, value_bits) -> str | None:
    if value_bits not in _BITS:
        return f"value bits={value_bits} (the Triton kernels take {_BITS})"
    if value_codes.dtype != torch.uint8:
        return f"value codes dtype {value_codes.dtype} (expected uint8)"
    if value_scale.dtype not in SCALE_TYPES or value_zero.dtype != value_scale.dtype:
        return f"value scale/zero dtypes {value_scale.dtype}/{value_zero.dtype}"
    return None


def kivi_decode_reason(query, key_codes, key_scale, key_zero, key_rows, key_fp, value_codes, value_scale, value_zero,
                       value_rows, value_fp, mask, scale, key_bits, value_bits, group_size) -> str | None:  # fmt: skip
    """Why (well-formed: ``ops.kivi_decode``'s check ran) arguments cannot take :func:`kivi_decode`, or None."""
    tokens = value_rows + sum(v.shape[2] for v in value_fp)
    tensors = (key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, *key_fp, *value_fp)
    if reason := driver.reason(query, key_fp, value_fp, mask, group_size, tokens, tensors):
        return reason
    if key_bits not in _BITS:
        return f"key bits={key_bits} (the Triton kernels take {_BITS})"
    if key_codes.dtype != torch.uint8 or key_scale.dtype not in SCALE_TYPES or key_zero.dtype != key_scale.dtype:
        return f"key codes/scale/zero dtypes {key_codes.dtype}/{key_scale.dtype}/{key_zero.dtype}"
    return affine_values_reason(value_codes, value_scale, value_zero, value_bits)


def kivi_decode(query, key_codes, key_scale, key_zero, key_rows, key_fp, value_codes, value_scale, value_zero,
                value_rows, value_fp, mask, scale, key_bits, value_bits, group_size) -> torch.Tensor:  # fmt: skip
    """``ops.kivi_decode`` in one Triton launch (plus the split merge); arguments as there."""
    key_codes = inner(key_codes, 1)
    if not (key_scale.stride(-1) == 1 and key_scale.stride() == key_zero.stride()):
        key_scale, key_zero = key_scale.contiguous(), key_zero.contiguous()
    keys = [key_codes, *key_codes.stride()[:4], key_scale, key_zero, *key_scale.stride()[:3]]
    values = affine_value_args(value_codes, value_scale, value_zero)
    return driver.launch(_kivi_decode, query, mask, key_fp, value_fp, key_rows * group_size, value_rows, scale,
                         keys + values, group_size, G=group_size, KB=key_bits, VB=value_bits)  # fmt: skip
