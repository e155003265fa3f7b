"""KIVI's fast CPU kernels (``cpu.cpp``): what each one trusts, checked here, and the ctypes calls.

Each ``check_*`` is the one place its kernel's inputs are validated (see :mod:`kvpack.kernels.checks`);
the ``*_cpu`` implementations assume it returned None. :mod:`kvpack.methods.kivi.ops` wires both into the
kernel ops.
"""

from __future__ import annotations

import ctypes

import torch

from ...kernels import decode, native
from ...kernels.checks import (
    SCALE_TYPES,
    bits_in,
    codes_reason,
    inner,
    inner_contiguous,
    not_cpu,
    same,
    scale_reason,
    small,
    tensor,
    tensors,
)
from . import reference

_BITS = (2, 4, 8)  # the score kernels
_QUANT_BITS = (1, 2, 4, 8)  # the quantize/pack kernels
_P, _I = ctypes.c_void_p, ctypes.c_int64


class KiviKeyScoresArgs(ctypes.Structure):
    _fields_ = [("query", _P), ("query_strides", _I * 4), ("codes", _P), ("codes_strides", _I * 2), ("scale", _P),
                ("zero", _P), ("scale_strides", _I * 2), ("scale_type", _I), ("batch", _I), ("heads", _I),
                ("rows", _I), ("groups", _I), ("head_dim", _I), ("group", _I), ("bits", _I), ("threads", _I),
                ("out", _P)]  # fmt: skip


class ValueWeightedSumArgs(ctypes.Structure):
    _fields_ = [("weights", _P), ("weights_strides", _I * 4), ("codes", _P), ("codes_strides", _I * 3),
                ("scale", _P), ("zero", _P), ("scale_strides", _I * 3), ("scale_type", _I), ("batch", _I),
                ("heads", _I), ("rows", _I), ("tokens", _I), ("head_dim", _I), ("group", _I), ("bits", _I),
                ("threads", _I), ("out", _P)]  # fmt: skip


class QuantizeArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("x_type", _I), ("x_strides", _I * 4), ("batch", _I), ("heads", _I), ("tokens", _I),
                ("head_dim", _I), ("group", _I), ("bits", _I), ("scale_type", _I), ("threads", _I), ("codes", _P),
                ("scale", _P), ("zero", _P)]  # fmt: skip


class KiviDecodeArgs(ctypes.Structure):
    _fields_ = [("common", decode.DecodeArgs), ("key_codes", _P), ("key_codes_strides", _I * 2), ("key_scale", _P),
                ("key_zero", _P), ("key_scale_strides", _I * 2), ("value_codes", _P), ("value_codes_strides", _I * 3),
                ("value_scale", _P), ("value_zero", _P), ("value_scale_strides", _I * 3), ("scale_type", _I),
                ("key_bits", _I), ("value_bits", _I), ("group", _I)]  # fmt: skip


native.entry("kvpack_kivi_key_scores", KiviKeyScoresArgs)
native.entry("kvpack_kivi_decode", KiviDecodeArgs)
native.entry("kvpack_value_weighted_sum", ValueWeightedSumArgs)


class QuantizeIntoArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("x_type", _I), ("x_strides", _I * 4), ("batch", _I), ("heads", _I), ("tokens", _I),
                ("head_dim", _I), ("group", _I), ("bits", _I), ("scale_type", _I), ("threads", _I), ("codes", _P),
                ("codes_strides", _I * 3), ("scale", _P), ("zero", _P), ("scale_strides", _I * 3)]  # fmt: skip


native.entry("kvpack_quantize_tokens", QuantizeArgs)
native.entry("kvpack_quantize_tokens_into", QuantizeIntoArgs)
native.entry("kvpack_quantize_key_groups", QuantizeArgs)


# --- checks ------------------------------------------------------------------------------------------------
def check_kivi_key_scores(query, codes, scale, zero, bits) -> str | None:
    tensor("query", query, 4)
    tensor("codes", codes, 5)
    tensor("scale", scale, 4)
    tensor("zero", zero, 4)
    bits_in(bits, _QUANT_BITS)
    batch, heads, rows, dim = query.shape
    code_shape = codes.shape
    if code_shape[0] != batch or code_shape[1] != heads or code_shape[3] != dim:
        same("codes", code_shape[:2] + code_shape[3:4], (batch, heads, dim), "(batch, heads, head_dim)")
    if scale.shape != code_shape[:4]:
        same("scale", scale.shape, code_shape[:4], "shape")
    if zero.shape != scale.shape:
        same("zero", zero.shape, scale.shape, "shape")
    group = code_shape[4] * 8 // bits
    small(("rows", "head_dim", "group"), rows, dim, group)
    if bits not in _BITS:
        return f"bits={bits} (fast kernels take {_BITS})"
    if group % 8:
        return f"group_size {group} (fast kernels need a multiple of 8)"
    if query.dtype is not torch.float32:
        return not_cpu(query, codes, scale, zero) or f"query dtype {query.dtype} (expected float32)"
    return not_cpu(query, codes, scale, zero) or codes_reason(codes) or scale_reason(scale, zero)


def check_value_weighted_sum(weights, codes, scale, zero, bits, group_size) -> str | None:
    tensor("weights", weights, 4)
    tensor("codes", codes, 4)
    tensor("scale", scale, 4)
    tensor("zero", zero, 4)
    bits_in(bits, _QUANT_BITS)
    if type(group_size) is not int or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    batch, heads, rows, tokens = weights.shape
    code_shape, scale_shape = codes.shape, scale.shape
    if code_shape[:3] != (batch, heads, tokens):
        same("codes", code_shape[:3], (batch, heads, tokens), "(batch, heads, tokens)")
    if scale_shape[:3] != (batch, heads, tokens):
        same("scale", scale_shape[:3], (batch, heads, tokens), "(batch, heads, tokens)")
    if zero.shape != scale_shape:
        same("zero", zero.shape, scale_shape, "shape")
    dim = scale_shape[3] * group_size
    if dim * bits % 8 or code_shape[3] != dim * bits // 8:
        raise ValueError(
            f"codes hold {code_shape[3]} bytes per token; {dim} channels at {bits} bits need {dim * bits / 8}"
        )
    small(("rows", "head_dim", "group_size"), rows, dim, group_size)
    if bits not in _BITS:
        return f"bits={bits} (fast kernels take {_BITS})"
    if group_size % 8:
        return f"group_size {group_size} (fast kernels need a multiple of 8)"
    if weights.dtype is not torch.float32:
        return not_cpu(weights, codes, scale, zero) or f"weights dtype {weights.dtype} (expected float32)"
    return not_cpu(weights, codes, scale, zero) or codes_reason(codes) or scale_reason(scale, zero)


def check_rows(name: str, used, capacity: int) -> None:
    """``used`` rows of a decode op's row tensors (which may hold more: the store's capacity) is an int in
    [0, capacity]."""
    if type(used) is not int or not 0 <= used <= capacity:
        raise ValueError(f"{name} must be an int in [0, {capacity}] (rows held by its tensors), got {used!r}")


def check_affine_values(codes, scale, zero, used, batch, heads, dim, bits, group_size) -> str | None:
    """Per-token affine value rows (KIVI's and QJL's) as the decode steps read them: codes (B, H, T, D * bits
    / 8) uint8, scale/zero (B, H, T, D / G) of one scale dtype, of which the first ``used`` tokens count."""
    tensor("value_codes", codes, 4)
    tensor("value_scale", scale, 4)
    tensor("value_zero", zero, 4)
    bits_in(bits, _QUANT_BITS)
    if type(group_size) is not int or group_size <= 0 or dim % group_size or dim * bits % 8:
        raise ValueError(f"group_size {group_size!r} and value bits {bits} do not fit head_dim {dim}")
    tokens = codes.shape[2]
    check_rows("value_rows", used, tokens)
    if codes.shape != (batch, heads, tokens, dim * bits // 8):
        same("value_codes", codes.shape, (batch, heads, tokens, dim * bits // 8), "shape")
    if scale.shape != (batch, heads, tokens, dim // group_size):
        same("value_scale", scale.shape, (batch, heads, tokens, dim // group_size), "shape")
    if zero.shape != scale.shape:
        same("value_zero", zero.shape, scale.shape, "shape")
    if bits not in _BITS:
        return f"value bits={bits} (fast kernels take {_BITS})"
    if group_size % 8:
        return f"group_size {group_size} (fast kernels need a multiple of 8)"
    return not_cpu(codes, scale, zero) or codes_reason(codes) or scale_reason(scale, zero)


def check_kivi_decode(query, key_codes, key_scale, key_zero, key_rows, key_fp, value_codes, value_scale, value_zero,
                      value_rows, value_fp, mask, scale, key_bits, value_bits, group_size) -> str | None:  # fmt: skip
    tensor("query", query, 4)
    tensor("key_codes", key_codes, 5)
    tensor("key_scale", key_scale, 4)
    tensor("key_zero", key_zero, 4)
    bits_in(key_bits, _QUANT_BITS)
    batch, heads, _, dim = query.shape
    reason = check_affine_values(value_codes, value_scale, value_zero, value_rows, batch, heads, dim, value_bits,
                                 group_size)  # fmt: skip
    n_groups = key_codes.shape[2]
    check_rows("key_rows", key_rows, n_groups)
    if group_size * key_bits % 8 or key_codes.shape != (batch, heads, n_groups, dim, group_size * key_bits // 8):
        same("key_codes", key_codes.shape, (batch, heads, n_groups, dim, group_size * key_bits / 8), "shape")
    if key_scale.shape != key_codes.shape[:4]:
        same("key_scale", key_scale.shape, key_codes.shape[:4], "shape")
    if key_zero.shape != key_scale.shape:
        same("key_zero", key_zero.shape, key_scale.shape, "shape")
    common, _ = decode.check(query, key_fp, value_fp, mask, scale, key_rows * group_size, value_rows)
    if key_bits not in _BITS:
        return f"key bits={key_bits} (fast kernels take {_BITS})"
    if key_scale.dtype != value_scale.dtype:
        return f"key and value scale dtypes differ ({key_scale.dtype}, {value_scale.dtype})"
    return (reason or common or not_cpu(key_codes, key_scale, key_zero) or codes_reason(key_codes)
            or scale_reason(key_scale, key_zero))  # fmt: skip


def check_quantize(x, bits, group_size, scale_dtype=None) -> str | None:
    """Both quantize kernels; arguments the reference refuses (bits, a group size that does not divide the
    axis) are left to the reference, which the fast implementation then calls."""
    tensors(x=(x, 4))
    if scale_dtype is not None and not isinstance(scale_dtype, torch.dtype):
        raise TypeError(f"scale_dtype must be a torch.dtype or None, got {scale_dtype!r}")
    if reason := not_cpu(x):
        return reason
    if x.dtype not in SCALE_TYPES:
        return f"input dtype {x.dtype} (fast kernels take float32, float16, bfloat16)"
    if (scale_dtype or x.dtype) not in SCALE_TYPES:
        return f"scale dtype {scale_dtype}"
    return None


# --- implementations ---------------------------------------------------------------------------------------
def kivi_key_scores_cpu(query, codes, scale, zero, bits):
    batch, heads, rows, dim = query.shape
    n_groups = codes.shape[2]
    group = codes.shape[-1] * 8 // bits
    if query.stride(-1) != 1:
        query = query.contiguous()
    if not inner_contiguous(codes, 3):
        codes = codes.contiguous()
    if not (inner_contiguous(scale, 2) and scale.stride() == zero.stride()):
        scale, zero = scale.contiguous(), zero.contiguous()
    out = torch.empty(batch, heads, rows, n_groups * group, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_()
    args = KiviKeyScoresArgs(query.data_ptr(), query.stride(), codes.data_ptr(), codes.stride()[:2], scale.data_ptr(),
                             zero.data_ptr(), scale.stride()[:2], SCALE_TYPES[scale.dtype], batch, heads, rows,
                             n_groups, dim, group, bits, torch.get_num_threads(), out.data_ptr())  # fmt: skip
    native.call("kvpack_kivi_key_scores", args)
    return out


def value_weighted_sum_cpu(weights, codes, scale, zero, bits, group_size):
    batch, heads, rows, tokens = weights.shape
    dim = scale.shape[-1] * group_size
    if weights.stride(-1) != 1:
        weights = weights.contiguous()
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    if not (scale.stride(-1) == 1 and scale.stride() == zero.stride()):
        scale, zero = scale.contiguous(), zero.contiguous()
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    if tokens == 0 or out.numel() == 0:
        return out.zero_()
    args = ValueWeightedSumArgs(weights.data_ptr(), weights.stride(), codes.data_ptr(), codes.stride()[:3],
                                scale.data_ptr(), zero.data_ptr(), scale.stride()[:3], SCALE_TYPES[scale.dtype],
                                batch, heads, rows, tokens, dim, group_size, bits, torch.get_num_threads(),
                                out.data_ptr())  # fmt: skip
    native.call("kvpack_value_weighted_sum", args)
    return out


def affine_value_views(codes, scale, zero):
    """The value rows with the layout the decode kernels read (last axis contiguous, scale/zero alike)."""
    codes = inner(codes, 1)
    if not (scale.stride(-1) == 1 and scale.stride() == zero.stride()):
        scale, zero = scale.contiguous(), zero.contiguous()
    return codes, scale, zero


def kivi_decode_cpu(query, key_codes, key_scale, key_zero, key_rows, key_fp, value_codes, value_scale, value_zero,
                    value_rows, value_fp, mask, scale, key_bits, value_bits, group_size):  # fmt: skip
    batch, heads, rows, dim = query.shape
    key_quantized, value_quantized = key_rows * group_size, value_rows
    tokens = value_quantized + sum(v.shape[2] for v in value_fp)
    key_codes = inner(key_codes, 3)
    if not (inner_contiguous(key_scale, 2) and key_scale.stride() == key_zero.stride()):
        key_scale, key_zero = key_scale.contiguous(), key_zero.contiguous()
    value_codes, value_scale, value_zero = affine_value_views(value_codes, value_scale, value_zero)
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float32)
    common, kept = decode.fields(query, key_fp, value_fp, mask, scale, key_quantized, value_quantized, tokens, out)
    native.call_flat("kvpack_kivi_decode", [
        *common, key_codes.data_ptr(), *key_codes.stride()[:2], key_scale.data_ptr(), key_zero.data_ptr(),
        *key_scale.stride()[:2], value_codes.data_ptr(), *value_codes.stride()[:3], value_scale.data_ptr(),
        value_zero.data_ptr(), *value_scale.stride()[:3], SCALE_TYPES[key_scale.dtype], key_bits, value_bits,
        group_size])  # fmt: skip
    return out


def _quantize(entry, x, bits, group_size, scale_dtype, n_rows, shapes):
    """Run a quantize entry point; ``shapes``: (codes shape, scale shape). Returns None if the C++ flagged a
    NaN or a scale overflow (the caller then runs the reference, which raises its ValueError)."""
    small(("head_dim", "group_size"), x.shape[-1], group_size)
    scale_dtype = scale_dtype or x.dtype
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty(shapes[0], dtype=torch.uint8)
    scale = torch.empty(shapes[1], dtype=scale_dtype)
    zero = torch.empty_like(scale)
    batch, heads, _, dim = x.shape
    args = QuantizeArgs(x.data_ptr(), SCALE_TYPES[x.dtype], x.stride(), batch, heads, n_rows, dim, group_size, bits,
                        SCALE_TYPES[scale_dtype], torch.get_num_threads(), codes.data_ptr(), scale.data_ptr(),
                        zero.data_ptr())  # fmt: skip
    return None if native.call(entry, args) else (codes, scale, zero)


def _refused_by_reference(x, bits, group_size, axis_length) -> bool:
    return (type(bits) is not int or bits not in _QUANT_BITS or type(group_size) is not int or group_size <= 0
            or axis_length % group_size or x.numel() == 0)  # fmt: skip


def quantize_pack_tokens_cpu(values, bits, group_size, scale_dtype=None):
    batch, heads, tokens, dim = values.shape
    if not _refused_by_reference(values, bits, group_size, dim):
        shapes = (batch, heads, tokens, (dim * bits + 7) // 8), (batch, heads, tokens, dim // group_size)
        result = _quantize("kvpack_quantize_tokens", values, bits, group_size, scale_dtype, tokens, shapes)
        if result is not None:
            return result
    return reference.quantize_pack_tokens(values, bits, group_size, scale_dtype)  # raises, or trivial


def quantize_tokens_into(values, bits, group_size, scale_dtype, codes, scale, zero) -> bool:
    """``quantize_pack_tokens`` written straight into three row buffers (:class:`kvpack.store.GrowBuffer`) at
    their free slots, advancing their lengths: bit for bit what the op returns, without allocating outputs
    and copying them in. False, with nothing stored, where that cannot run (another backend policy or
    device, no room without growing, buffers of another layout, a NaN or an overflowing scale): the caller
    then takes the op's path, which raises what the reference raises."""
    from ...kernels import backend

    if backend() == "reference" or native.available() or check_quantize(values, bits, group_size, scale_dtype):
        return False
    batch, heads, tokens, dim = values.shape
    if _refused_by_reference(values, bits, group_size, dim) or dim * bits % 8:
        return False
    at = codes.free_slot(tokens)
    if at is None or scale.free_slot(tokens) != at or zero.free_slot(tokens) != at:
        return False
    c, sc, ze = codes.data, scale.data, zero.data
    scale_dtype = scale_dtype or values.dtype
    if (c.dtype != torch.uint8 or c.dim() != 4 or c.shape[:2] != (batch, heads) or c.shape[3] != dim * bits // 8
            or sc.dtype != scale_dtype or sc.dim() != 4 or sc.shape[:2] != (batch, heads)
            or sc.shape[3] != dim // group_size or ze.shape != sc.shape or ze.dtype != sc.dtype
            or c.stride(3) != 1 or sc.stride(3) != 1 or ze.stride() != sc.stride()
            or not (c.is_cpu and sc.is_cpu and ze.is_cpu)):  # fmt: skip
        return False
    small(("head_dim", "group_size"), dim, group_size)
    if values.stride(-1) != 1:
        values = values.contiguous()
    cs, ss, size = c.stride(), sc.stride(), sc.element_size()
    bad = native.call_flat("kvpack_quantize_tokens_into", [
        values.data_ptr(), SCALE_TYPES[values.dtype], *values.stride(), batch, heads, tokens, dim, group_size, bits,
        SCALE_TYPES[scale_dtype], torch.get_num_threads(), c.data_ptr() + at * cs[2], *cs[:3],
        sc.data_ptr() + at * ss[2] * size, ze.data_ptr() + at * ss[2] * size, *ss[:3]])  # fmt: skip
    if bad:
        return False  # only free slots were written: nothing is stored
    for buf in (codes, scale, zero):
        buf.length += tokens
    return True


def quantize_pack_key_groups_cpu(keys, bits, group_size, scale_dtype=None):
    batch, heads, tokens, dim = keys.shape
    if not _refused_by_reference(keys, bits, group_size, tokens):
        n_groups = tokens // group_size
        shapes = (batch, heads, n_groups, dim, (group_size * bits + 7) // 8), (batch, heads, n_groups, dim)
        result = _quantize("kvpack_quantize_key_groups", keys, bits, group_size, scale_dtype, n_groups, shapes)
        if result is not None:
            return result
    return reference.quantize_pack_key_groups(keys, bits, group_size, scale_dtype)
