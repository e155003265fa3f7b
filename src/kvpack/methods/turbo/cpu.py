"""Turbo's fast CPU kernels (``cpu.cpp``): what each one trusts, checked here, and the ctypes calls."""

from __future__ import annotations

import ctypes

import torch

from ...kernels import native
from ...kernels.checks import SCALE_TYPES, bits_in, codes_reason, inner, not_cpu, small, tensor

_BITS = (1, 2, 4, 8)
_P, _I = ctypes.c_void_p, ctypes.c_int64


class TurboArgs(ctypes.Structure):
    _fields_ = [("rows_in", _P), ("rows_strides", _I * 4), ("codes", _P), ("codes_strides", _I * 3), ("scale", _P),
                ("scale_strides", _I * 3), ("scale_type", _I), ("codebook", _P), ("batch", _I), ("heads", _I),
                ("rows", _I), ("tokens", _I), ("head_dim", _I), ("bits", _I), ("threads", _I), ("out", _P)]  # fmt: skip


native.entry("kvpack_turbo_key_scores", TurboArgs)
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
