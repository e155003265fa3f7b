"""QJL's fast CPU kernels (``cpu.cpp``): what each one trusts, checked here, and the ctypes calls."""

from __future__ import annotations

import ctypes

import torch

from ...kernels import decode, native
from ...kernels.checks import SCALE_TYPES, inner, not_cpu, same, scale_reason, small, tensors
from ..kivi.cpu import affine_value_views, check_affine_values, check_rows

_P, _I = ctypes.c_void_p, ctypes.c_int64


class QJLKeyRowArgs(ctypes.Structure):
    _fields_ = [("sketched", _P), ("sketch_t", _P), ("outlier_idx", _P), ("outlier_idx_strides", _I * 2),
                ("signs", _P), ("signs_strides", _I * 2), ("norms", _P), ("norms_strides", _I * 2),
                ("outlier_signs", _P), ("outlier_signs_strides", _I * 2), ("outlier_norms", _P),
                ("outlier_norms_strides", _I * 2)]  # fmt: skip


class QJLKeyScoresArgs(ctypes.Structure):
    _fields_ = [("query", _P), ("query_strides", _I * 4), ("keys", QJLKeyRowArgs), ("norm_type", _I), ("batch", _I),
                ("heads", _I), ("rows", _I), ("groups", _I), ("head_dim", _I), ("group", _I), ("sketch_dim", _I),
                ("outlier_sketch_dim", _I), ("outliers", _I), ("threads", _I), ("out", _P)]  # fmt: skip


class PackSignsArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("row_stride", _I), ("rows", _I), ("bits", _I), ("threads", _I), ("out", _P)]


class QJLDecodeArgs(ctypes.Structure):
    _fields_ = [("common", decode.DecodeArgs), ("keys", QJLKeyRowArgs), ("norm_type", _I), ("group", _I),
                ("sketch_dim", _I), ("outlier_sketch_dim", _I), ("outliers", _I), ("value_codes", _P),
                ("value_codes_strides", _I * 3), ("value_scale", _P), ("value_zero", _P),
                ("value_scale_strides", _I * 3), ("value_scale_type", _I), ("value_bits", _I)]  # fmt: skip


native.entry("kvpack_qjl_key_scores", QJLKeyScoresArgs)
native.entry("kvpack_qjl_decode", QJLDecodeArgs)
native.entry("kvpack_pack_signs", PackSignsArgs)


def check_qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms) -> str | None:
    tensors(query=(query, 4), sketch=(sketch, 2), outlier_idx=(outlier_idx, 4), signs=(signs, 5), norms=(norms, 4),
            outlier_signs=(outlier_signs, 5), outlier_norms=(outlier_norms, 4))  # fmt: skip
    batch, heads, rows, dim = query.shape
    same("signs", signs.shape[:2], (batch, heads), "(batch, heads)")
    n_groups, group = signs.shape[2], signs.shape[3]
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    if m == 0:
        raise ValueError("signs hold no sketch bits (a sketch needs at least 8 rows)")
    same("sketch", sketch.shape, (m, dim), "shape (sketch rows, head_dim)")
    same("outlier_idx", outlier_idx.shape[:3], (batch, heads, n_groups), "(batch, heads, groups)")
    same("norms", norms.shape, signs.shape[:4], "shape")
    same("outlier_signs", outlier_signs.shape[:4], signs.shape[:4], "(batch, heads, groups, group)")
    same("outlier_norms", outlier_norms.shape, signs.shape[:4], "shape")
    if k > dim or m_o > m:
        raise ValueError(f"{k} outlier channels of head_dim {dim}, or an outlier sketch of {m_o} > {m} rows")
    if outlier_idx.is_floating_point() or outlier_idx.dtype == torch.bool or outlier_idx.is_complex():
        raise TypeError(f"outlier_idx must be an integer tensor, got {outlier_idx.dtype}")
    small(("rows", "head_dim", "group", "sketch_dim"), rows, dim, group, m)
    if reason := not_cpu(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
        return reason
    if query.dtype != torch.float32 or sketch.dtype != torch.float32:
        return f"query/sketch dtypes {query.dtype}/{sketch.dtype} (expected float32)"
    if outlier_idx.dtype != torch.uint8:
        return f"outlier_idx dtype {outlier_idx.dtype} (fast kernels take uint8, head_dim <= 256)"
    if signs.dtype != torch.uint8 or outlier_signs.dtype != torch.uint8:
        return f"sign dtypes {signs.dtype}/{outlier_signs.dtype} (expected uint8)"
    return scale_reason(norms, outlier_norms, "norm")


def check_qjl_decode(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms, key_rows, key_fp,
                     value_codes, value_scale, value_zero, value_rows, value_fp, mask, scale, value_bits,
                     group_size) -> str | None:  # fmt: skip
    keys = check_qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms)
    batch, heads, _, dim = query.shape
    check_rows("key_rows", key_rows, signs.shape[2])
    if signs.shape[3] != group_size:
        raise ValueError(f"signs hold groups of {signs.shape[3]} tokens, not group_size {group_size}")
    values = check_affine_values(value_codes, value_scale, value_zero, value_rows, batch, heads, dim, value_bits,
                                 group_size)  # fmt: skip
    common, _ = decode.check(query, key_fp, value_fp, mask, scale, key_rows * group_size, value_rows)
    return keys or values or common


def qjl_decode_cpu(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms, key_rows, key_fp,
                   value_codes, value_scale, value_zero, value_rows, value_fp, mask, scale, value_bits, group_size):  # fmt: skip
    batch, heads, rows, dim = query.shape
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    m_o = m_o if k else 0
    if query.stride(-1) != 1:
        query = query.contiguous()
    sketched = (query @ sketch.T).contiguous()  # (B, H, M, m) = S q
    sketch_t = sketch.T.contiguous()
    signs, norms = inner(signs, 3), inner(norms, 2)
    idx = inner(outlier_idx, 2) if k else None
    if m_o:
        outlier_signs, outlier_norms = inner(outlier_signs, 3), inner(outlier_norms, 2)
    value_codes, value_scale, value_zero = affine_value_views(value_codes, value_scale, value_zero)
    tokens = value_rows + sum(v.shape[2] for v in value_fp)
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    common, kept = decode.fields(query, key_fp, value_fp, mask, scale, key_rows * group_size, value_rows, tokens, out)
    idx_fields = (idx.data_ptr(), *idx.stride()[:2]) if k else (0, 0, 0)
    outlier_fields = ((outlier_signs.data_ptr(), *outlier_signs.stride()[:2], outlier_norms.data_ptr(),
                       *outlier_norms.stride()[:2]) if m_o else (0,) * 6)  # fmt: skip
    bad = native.call_flat("kvpack_qjl_decode", [
        *common, sketched.data_ptr(), sketch_t.data_ptr(), *idx_fields, signs.data_ptr(), *signs.stride()[:2],
        norms.data_ptr(), *norms.stride()[:2], *outlier_fields, SCALE_TYPES[norms.dtype], group_size, m, m_o, k,
        value_codes.data_ptr(), *value_codes.stride()[:3], value_scale.data_ptr(), value_zero.data_ptr(),
        *value_scale.stride()[:3], SCALE_TYPES[value_scale.dtype], value_bits])  # fmt: skip
    if bad:
        raise ValueError(f"outlier_idx holds channel indices outside [0, {dim}) (head_dim)")
    return out


def check_pack_signs(x) -> str | None:
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided or x.dim() < 1:
        raise TypeError(f"pack_signs takes a dense tensor of at least one dimension, got {x!r:.80}")
    small(("sketch_dim",), x.shape[-1])
    if reason := not_cpu(x):
        return reason
    return None if x.dtype == torch.float32 else f"input dtype {x.dtype} (expected float32)"


def qjl_key_scores_cpu(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
    batch, heads, rows, dim = query.shape
    n_groups, group = signs.shape[2], signs.shape[3]
    m, m_o, k = signs.shape[-1] * 8, outlier_signs.shape[-1] * 8, outlier_idx.shape[-1]
    if query.stride(-1) != 1:
        query = query.contiguous()
    sketched = (query @ sketch.T).contiguous()  # (B, H, M, m) = S q
    sketch_t = sketch.T.contiguous()  # (D, m): the columns of S, one per channel
    signs, norms = inner(signs, 3), inner(norms, 2)
    out = torch.empty(batch, heads, rows, n_groups * group, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_()
    m_o = m_o if k else 0  # without outlier channels there is no outlier part
    # Absent inputs (no outliers: k = 0; no outlier sketch: m_o = 0) travel as null pointers, strides 0.
    idx = inner(outlier_idx, 2) if k else None
    if m_o:
        outlier_signs, outlier_norms = inner(outlier_signs, 3), inner(outlier_norms, 2)

    def optional(t, used):
        return (t.data_ptr(), t.stride()[:2]) if used else (None, (0, 0))

    (idx_ptr, idx_s), (os_ptr, os_s), (on_ptr, on_s) = optional(idx, k), optional(outlier_signs, m_o), optional(
        outlier_norms, m_o)  # fmt: skip
    keys = QJLKeyRowArgs(sketched.data_ptr(), sketch_t.data_ptr(), idx_ptr, idx_s, signs.data_ptr(), signs.stride()[:2],
                         norms.data_ptr(), norms.stride()[:2], os_ptr, os_s, on_ptr, on_s)  # fmt: skip
    args = QJLKeyScoresArgs(query.data_ptr(), query.stride(), keys, SCALE_TYPES[norms.dtype], batch, heads, rows,
                            n_groups, dim, group, m, m_o, k, torch.get_num_threads(), out.data_ptr())  # fmt: skip
    if native.call("kvpack_qjl_key_scores", args):
        raise ValueError(f"outlier_idx holds channel indices outside [0, {dim}) (head_dim)")
    return out


def pack_signs_cpu(x):
    m = x.shape[-1]
    out = torch.empty(x.shape[:-1] + ((m + 7) // 8,), dtype=torch.uint8)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, m)  # a view when x's leading axes are mergeable, else one copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    native.call("kvpack_pack_signs", PackSignsArgs(rows.data_ptr(), rows.stride(0), rows.shape[0], m,
                                                   torch.get_num_threads(), out.data_ptr()))  # fmt: skip
    return out
