"""Turbo's fast CPU kernels (``cpu.cpp``): what each one trusts, checked here, and the ctypes calls."""

from __future__ import annotations

import ctypes

import torch

from ...kernels import decode, native
from ...kernels.checks import SCALE_TYPES, bits_in, codes_reason, inner, inner_contiguous, not_cpu, small, tensor
from ..kivi.cpu import check_rows

_BITS = (1, 2, 4, 8)
_P, _I = ctypes.c_void_p, ctypes.c_int64


class TurboArgs(ctypes.Structure):
    _fields_ = [("rows_in", _P), ("rows_strides", _I * 4), ("codes", _P), ("codes_strides", _I * 3), ("scale", _P),
                ("scale_strides", _I * 3), ("scale_type", _I), ("codebook", _P), ("batch", _I), ("heads", _I),
                ("rows", _I), ("tokens", _I), ("head_dim", _I), ("bits", _I), ("threads", _I), ("out", _P)]  # fmt: skip


class TurboDecodeArgs(ctypes.Structure):
    _fields_ = [("common", decode.DecodeArgs), ("key_codes", _P), ("key_codes_strides", _I * 3), ("key_scale", _P),
                ("key_scale_strides", _I * 3), ("key_codebook", _P), ("key_rotation", _P), ("value_codes", _P),
                ("value_codes_strides", _I * 3), ("value_scale", _P), ("value_scale_strides", _I * 3),
                ("value_codebook", _P), ("value_rotation", _P), ("scale_type", _I), ("key_bits", _I),
                ("value_bits", _I)]  # fmt: skip


native.entry("kvpack_turbo_key_scores", TurboArgs)
native.entry("kvpack_turbo_decode", TurboDecodeArgs)
native.entry("kvpack_turbo_weighted_sum", TurboArgs)


def _check(kernel, rows, codes, scale, codebook, bits) -> str | None:
    name = "query_rotated" if kernel == "turbo_key_scores" else "weights"
    tensor(name, rows, 4)
    tensor("codes", codes, 4)
    tensor("scale", scale, 3)
    tensor("codebook", codebook, 1)
    bits_in(bits, _BITS)
    batch, heads, n_rows, last = rows.shape
    tokens = codes.shape[2] if kernel == "turbo_key_scores" else last
    if codes.shape[:3] != (batch, heads, tokens) or scale.shape != (batch, heads, tokens):
        raise ValueError(
            f"codes {tuple(codes.shape)} and scale {tuple(scale.shape)} do not match {batch} batch, {heads} heads "
            f"and {tokens} tokens"
        )
    dim = last if kernel == "turbo_key_scores" else codes.shape[-1] * 8 // bits
    if codes.shape[-1] * 8 != dim * bits:
        raise ValueError(f"head_dim {dim} at {bits} bits does not fill the {codes.shape[-1]} code bytes")
    if codebook.shape != (2**bits,):
        raise ValueError(f"codebook shape {tuple(codebook.shape)} (expected ({2**bits},))")
    small(("rows", "head_dim"), n_rows, dim)
    if reason := not_cpu(rows, codes, scale, codebook) or codes_reason(codes):
        return reason
    if scale.dtype not in SCALE_TYPES:
        return f"scale dtype {scale.dtype} (fast kernels take float32, float16, bfloat16)"
    if rows.dtype != torch.float32 or codebook.dtype != torch.float32:
        return f"query/weights and codebook dtypes {rows.dtype}/{codebook.dtype} (expected float32)"
    return None


def check_turbo_key_scores(query_rotated, codes, scale, codebook, bits) -> str | None:
    return _check("turbo_key_scores", query_rotated, codes, scale, codebook, bits)


def check_turbo_weighted_sum(weights, codes, scale, codebook, bits) -> str | None:
    return _check("turbo_weighted_sum", weights, codes, scale, codebook, bits)


def _run(entry, rows, codes, scale, codebook, bits, tokens, dim, out):
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes, codebook = inner(codes, 1), codebook.contiguous()
    batch, heads, n_rows = rows.shape[:3]
    args = TurboArgs(rows.data_ptr(), rows.stride(), codes.data_ptr(), codes.stride()[:3], scale.data_ptr(),
                     scale.stride(), SCALE_TYPES[scale.dtype], codebook.data_ptr(), batch, heads, n_rows, tokens, dim,
                     bits, torch.get_num_threads(), out.data_ptr())  # fmt: skip
    native.call(entry, args)
    return out


def turbo_key_scores_cpu(query_rotated, codes, scale, codebook, bits):
    batch, heads, rows, dim = query_rotated.shape
    tokens = codes.shape[2]
    out = torch.empty(batch, heads, rows, tokens, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_()
    return _run("kvpack_turbo_key_scores", query_rotated, codes, scale, codebook, bits, tokens, dim, out)


def turbo_weighted_sum_cpu(weights, codes, scale, codebook, bits):
    batch, heads, rows, tokens = weights.shape
    dim = codes.shape[-1] * 8 // bits
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    if tokens == 0 or out.numel() == 0:
        return out.zero_()
    return _run("kvpack_turbo_weighted_sum", weights, codes, scale, codebook, bits, tokens, dim, out)


def _check_side(side: str, codes, scale, rotation, codebook, bits, batch, heads, dim, per_row: int) -> str | None:
    """One side's rows: codes (B, H, N, [G,] D * bits / 8) uint8, scale (B, H, N[, G]), rotation (D, D),
    codebook (2^bits,) float32; ``per_row`` tokens per row (G for keys, 1 for values)."""
    rank = 5 if per_row > 1 else 4
    tensor(f"{side}_codes", codes, rank)
    tensor(f"{side}_scale", scale, rank - 1)
    tensor(f"{side}_rotation", rotation, 2)
    tensor(f"{side}_codebook", codebook, 1)
    bits_in(bits, _BITS)
    n = codes.shape[2]
    want = (batch, heads, n, *((per_row,) if per_row > 1 else ()))
    if dim * bits % 8 or codes.shape != (*want, dim * bits // 8) or scale.shape != want:
        raise ValueError(f"{side} codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit {want} rows of "
                         f"{dim} channels at {bits} bits")  # fmt: skip
    if rotation.shape != (dim, dim) or codebook.shape != (2**bits,):
        raise ValueError(f"{side} rotation {tuple(rotation.shape)} / codebook {tuple(codebook.shape)} must be "
                         f"({dim}, {dim}) / ({2**bits},)")  # fmt: skip
    if reason := not_cpu(codes, scale, rotation, codebook) or codes_reason(codes):
        return reason
    if scale.dtype not in SCALE_TYPES:
        return f"{side} scale dtype {scale.dtype} (fast kernels take float32, float16, bfloat16)"
    if rotation.dtype != torch.float32 or codebook.dtype != torch.float32:
        return f"{side} rotation/codebook dtypes {rotation.dtype}/{codebook.dtype} (expected float32)"
    return None


def check_turbo_decode(query, key_codes, key_scale, key_rotation, key_codebook, key_rows, key_fp, value_codes,
                       value_scale, value_rotation, value_codebook, value_rows, value_fp, mask, scale, key_bits,
                       value_bits) -> str | None:  # fmt: skip
    tensor("query", query, 4)
    batch, heads, _, dim = query.shape
    group = key_codes.shape[3] if key_codes.dim() == 5 else 0
    keys = _check_side("key", key_codes, key_scale, key_rotation, key_codebook, key_bits, batch, heads, dim, group)
    values = _check_side("value", value_codes, value_scale, value_rotation, value_codebook, value_bits, batch, heads,
                         dim, 1)  # fmt: skip
    check_rows("key_rows", key_rows, key_codes.shape[2])
    check_rows("value_rows", value_rows, value_codes.shape[2])
    common, _ = decode.check(query, key_fp, value_fp, mask, scale, key_rows * group, value_rows)
    if key_scale.dtype != value_scale.dtype:
        return f"key and value scale dtypes differ ({key_scale.dtype}, {value_scale.dtype})"
    return keys or values or common


def turbo_decode_cpu(query, key_codes, key_scale, key_rotation, key_codebook, key_rows, key_fp, value_codes,
                     value_scale, value_rotation, value_codebook, value_rows, value_fp, mask, scale, key_bits,
                     value_bits):  # fmt: skip
    batch, heads, rows, dim = query.shape
    group = key_codes.shape[3]
    if not inner_contiguous(key_codes, 3):
        key_codes = key_codes.contiguous()
    if not inner_contiguous(key_scale, 2):
        key_scale = key_scale.contiguous()
    value_codes = inner(value_codes, 1)
    key_rotation, key_codebook, value_rotation, value_codebook = (
        x.contiguous() for x in (key_rotation, key_codebook, value_rotation, value_codebook))  # fmt: skip
    tokens = value_rows + sum(v.shape[2] for v in value_fp)
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    common, kept = decode.fields(query, key_fp, value_fp, mask, scale, key_rows * group, value_rows, tokens, out)
    ks, kss = key_codes.stride(), key_scale.stride()  # token strides: a group's G rows, then the next group's
    native.call_flat("kvpack_turbo_decode", [
        *common, key_codes.data_ptr(), ks[0], ks[1], ks[3], key_scale.data_ptr(), kss[0], kss[1], kss[3],
        key_codebook.data_ptr(), key_rotation.data_ptr(), value_codes.data_ptr(), *value_codes.stride()[:3],
        value_scale.data_ptr(), *value_scale.stride()[:3], value_codebook.data_ptr(), value_rotation.data_ptr(),
        SCALE_TYPES[key_scale.dtype], key_bits, value_bits])  # fmt: skip
    return out
