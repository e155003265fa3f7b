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

from ...kernels import gpu
from ...kernels import triton_decode as driver
from ...kernels.checks import SCALE_TYPES, inner

__all__ = [
    "kivi_decode", "kivi_decode_reason", "quantize_pack_key_groups", "quantize_pack_key_groups_reason",
    "quantize_pack_tokens", "quantize_pack_tokens_reason",
]  # fmt: skip

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
    kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n, kf2, kf2_sb, kf2_sh, kf2_sl, kf2_n,
    vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n, vf2, vf2_sb, vf2_sh, vf2_sl, vf2_n,
    kc, kc_sb, kc_sh, kc_sn, kc_sd, ks, kz, ks_sb, ks_sh, ks_sn,
    vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st,
    out, part_m, part_l, H, M, KQ, VQ, T, CHUNK, splits, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
    EMULATE: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
):  # fmt: skip
    bh, split, b, h, om, od, oj, start, end, m_i, l_i, acc = driver.program(H, T, CHUNK, BLOCK_M, D, G)
    query = tl.load(q + b * q_sb + h * q_sh + om[:, None] * q_sm + od[None, :], mask=(om < M)[:, None], other=0.0)
    both = tl.minimum(KQ, VQ)
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
                keys = tl.trans(driver.fp_rows(kf0, kf0_sb, kf0_sh, kf0_sl, kf0_n, kf1, kf1_sb, kf1_sh, kf1_sl, kf1_n,
                                               kf2, kf2_sb, kf2_sh, kf2_sl, kf2_n, b, h, t - KQ, od))  # fmt: skip
            packed = affine_values(vc, vc_sb, vc_sh, vc_st, vs, vz, vs_sb, vs_sh, vs_st, b, h, t, t < VQ, od, VB, G)
            fp = driver.fp_rows(vf0, vf0_sb, vf0_sh, vf0_sl, vf0_n, vf1, vf1_sb, vf1_sh, vf1_sl, vf1_n,
                                vf2, vf2_sb, vf2_sh, vf2_sl, vf2_n, b, h, t - VQ, od)  # fmt: skip
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


# --- quantize and pack at flush (bit for bit the reference: kvpack.primitives.quantize_affine) -------------
@triton.jit
def _to_storage(x, SCALE: tl.constexpr, EMULATE: tl.constexpr):
    """float32 -> the value the scale dtype stores (0 f32, 1 f16, 2 bf16), as float32 (round to nearest even)."""
    if SCALE == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif SCALE == 2:
        if EMULATE:
            x = driver.round_bf16(x)
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit
def _affine_codes(x, lo, hi, BITS: tl.constexpr, SCALE: tl.constexpr, EMULATE: tl.constexpr):
    """Groups ``x`` (..., G) with their min/max (..., 1) -> (codes (..., G) int32, scale, zero as stored)."""
    zero = _to_storage(lo, SCALE, EMULATE)
    scale = _to_storage(tl.div_rn(hi - lo, (2**BITS - 1) * 1.0), SCALE, EMULATE)
    safe = tl.where(scale > 0, scale, 1.0)
    q = tl.div_rn(x - zero, safe)
    r = tl.floor(q + 0.5)
    r = tl.where((r - q == 0.5) & (r % 2 == 1), r - 1.0, r)  # ties to even, as torch.round
    r = tl.minimum(tl.maximum(r, 0.0), 2**BITS - 1.0)
    return tl.where(scale > 0, r, 0.0).to(tl.int32), scale, zero


@triton.jit
def _pack(codes, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, N) codes -> (ROWS, N * BITS / 8) bytes, code j of a byte in bits j * BITS (LSB first)."""
    per_byte: tl.constexpr = 8 // BITS
    grouped = tl.reshape(codes, (ROWS, N // per_byte, per_byte))
    shifts = tl.arange(0, per_byte) * BITS
    return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _bad(values, scale, zero, ROWS: tl.constexpr, GROUPS: tl.constexpr):
    """Per row: 1 where an input is NaN/Inf or a stored scale/zero overflows (the reference then raises)."""
    bad = tl.max(((values != values) | (tl.abs(values) == float("inf"))).to(tl.int32), axis=1)
    overflow = (tl.abs(scale) == float("inf")) | (tl.abs(zero) == float("inf"))
    return bad | tl.max(tl.reshape(overflow.to(tl.int32), (ROWS, GROUPS)), axis=1)


@triton.jit
def _quantize_tokens(x, x_sb, x_sh, x_st, codes, scale, zero, flags, H, T, R,
                     D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, SCALE: tl.constexpr,
                     EMULATE: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, h, t)
    live = rows < R
    b = (rows // (H * T)).to(tl.int64)
    h = ((rows // T) % H).to(tl.int64)
    t = (rows % T).to(tl.int64)
    od = tl.arange(0, D)
    values = tl.load(x + (b * x_sb + h * x_sh + t * x_st)[:, None] + od[None, :], mask=live[:, None], other=0.0)
    values = values.to(tl.float32)
    groups = tl.reshape(values, (BLOCK_R, D // G, G))
    lo = tl.min(groups, axis=2)
    hi = tl.max(groups, axis=2)
    code, s, z = _affine_codes(groups, lo[:, :, None], hi[:, :, None], BITS, SCALE, EMULATE)
    tl.store(flags + rows, _bad(values, s, z, BLOCK_R, D // G), mask=live)
    rows64 = rows.to(tl.int64)
    ob = tl.arange(0, D * BITS // 8)
    tl.store(codes + rows64[:, None] * (D * BITS // 8) + ob[None, :], _pack(tl.reshape(code, (BLOCK_R, D)), BLOCK_R, D, BITS),
             mask=live[:, None])  # fmt: skip
    og = tl.arange(0, D // G)
    at = rows64[:, None] * (D // G) + og[None, :]
    tl.store(scale + at, tl.reshape(s, (BLOCK_R, D // G)), mask=live[:, None])
    tl.store(zero + at, tl.reshape(z, (BLOCK_R, D // G)), mask=live[:, None])


@triton.jit
def _quantize_key_groups(x, x_sb, x_sh, x_st, codes, scale, zero, flags, H, N, D: tl.constexpr, G: tl.constexpr,
                         BITS: tl.constexpr, SCALE: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    group = tl.program_id(0)  # flat (b, h, n)
    b = (group // (H * N)).to(tl.int64)
    h = ((group // N) % H).to(tl.int64)
    n = (group % N).to(tl.int64)
    od = tl.arange(0, D)
    oj = tl.arange(0, G)
    tile = tl.load(x + b * x_sb + h * x_sh + (n * G + oj)[None, :] * x_st + od[:, None]).to(tl.float32)  # (D, G)
    lo = tl.min(tile, axis=1)
    hi = tl.max(tile, axis=1)
    code, s, z = _affine_codes(tile, lo[:, None], hi[:, None], BITS, SCALE, EMULATE)
    bad = _bad(tl.reshape(tile, (1, D * G)), tl.reshape(s, (1, D)), tl.reshape(z, (1, D)), 1, D)
    tl.store(flags + group + tl.arange(0, 1), bad)
    first = group.to(tl.int64) * D
    ob = tl.arange(0, G * BITS // 8)
    tl.store(codes + (first + od)[:, None] * (G * BITS // 8) + ob[None, :], _pack(code, D, G, BITS))
    tl.store(scale + first + od, tl.reshape(s, (D,)))
    tl.store(zero + first + od, tl.reshape(z, (D,)))


_QUANT_BITS = (1, 2, 4, 8)


def _quantize_reason(x, bits, group_size, scale_dtype, axis_length: int) -> str | None:
    """Why (well-formed: the op's check ran) a quantize call cannot take its Triton kernel, or None."""
    if reason := gpu.device_reason(x.device):
        return reason
    dim = x.shape[-1]
    if x.dtype not in SCALE_TYPES or (scale_dtype or x.dtype) not in SCALE_TYPES:
        return f"dtypes {x.dtype} / {scale_dtype}"
    if type(bits) is not int or bits not in _QUANT_BITS or type(group_size) is not int or group_size <= 0:
        return "bits or group_size the reference refuses"  # the reference raises its own error
    if axis_length % group_size or x.numel() == 0:
        return "a group size that does not divide the axis, or nothing to quantize"
    if dim & (dim - 1) or group_size & (group_size - 1) or dim > 1024 or group_size * bits < 8:
        return f"head_dim {dim} / group_size {group_size} (the Triton kernels take powers of 2)"
    return None


def quantize_pack_tokens_reason(values, bits, group_size, scale_dtype=None) -> str | None:
    return _quantize_reason(values, bits, group_size, scale_dtype, values.shape[-1])


def quantize_pack_key_groups_reason(keys, bits, group_size, scale_dtype=None) -> str | None:
    return _quantize_reason(keys, bits, group_size, scale_dtype, keys.shape[2])


def _scale_code(scale_dtype) -> tuple[int, bool]:
    code = SCALE_TYPES[scale_dtype]
    return code, code == 2 and gpu.interpreting()


def quantize_pack_tokens(values, bits, group_size, scale_dtype=None):
    """``ops.quantize_pack_tokens`` in one Triton launch, bit for bit the reference (which runs instead, and
    raises, where an input is not finite or a scale overflows)."""
    from . import reference

    batch, heads, tokens, dim = values.shape
    scale_dtype = scale_dtype or values.dtype
    x = inner(values, 1)
    device = x.device
    codes = torch.empty(batch, heads, tokens, dim * bits // 8, dtype=torch.uint8, device=device)
    scale = torch.empty(batch, heads, tokens, dim // group_size, dtype=scale_dtype, device=device)
    zero = torch.empty_like(scale)
    rows = batch * heads * tokens
    flags = torch.empty(rows, dtype=torch.int32, device=device)
    block = 16
    code, emulate = _scale_code(scale_dtype)
    _quantize_tokens[(triton.cdiv(rows, block),)](x, *x.stride()[:3], codes, scale, zero, flags, heads, tokens, rows,
                                                  D=dim, G=group_size, BITS=bits, SCALE=code, EMULATE=emulate,
                                                  BLOCK_R=block)  # fmt: skip
    if bool(flags.any()):  # one host read, as the reference's own overflow check
        return reference.quantize_pack_tokens(values, bits, group_size, scale_dtype)
    return codes, scale, zero


def quantize_pack_key_groups(keys, bits, group_size, scale_dtype=None):
    """``ops.quantize_pack_key_groups`` in one Triton launch (one program per key group), bit for bit the
    reference (which runs instead, and raises, where an input is not finite or a scale overflows)."""
    from . import reference

    batch, heads, tokens, dim = keys.shape
    scale_dtype = scale_dtype or keys.dtype
    x = inner(keys, 1)
    device = x.device
    n = tokens // group_size
    codes = torch.empty(batch, heads, n, dim, group_size * bits // 8, dtype=torch.uint8, device=device)
    scale = torch.empty(batch, heads, n, dim, dtype=scale_dtype, device=device)
    zero = torch.empty_like(scale)
    flags = torch.empty(batch * heads * n, dtype=torch.int32, device=device)
    code, emulate = _scale_code(scale_dtype)
    _quantize_key_groups[(batch * heads * n,)](x, *x.stride()[:3], codes, scale, zero, flags, heads, n, D=dim,
                                               G=group_size, BITS=bits, SCALE=code, EMULATE=emulate)  # fmt: skip
    if bool(flags.any()):
        return reference.quantize_pack_key_groups(keys, bits, group_size, scale_dtype)
    return codes, scale, zero
