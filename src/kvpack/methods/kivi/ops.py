"""KIVI's kernel ops (``torch.ops.kvpack.*``): the reference, the fast CPU kernel behind its check, a fake.

Arguments and results are those of :mod:`kvpack.methods.kivi.reference`.
"""

from __future__ import annotations

import torch

from ...kernels import Kernel, decode, triton_kernel
from . import cpu, reference

__all__ = ["kivi_decode", "kivi_key_scores", "quantize_pack_key_groups", "quantize_pack_tokens", "value_weighted_sum"]


def _key_scores_fake(query, codes, scale, zero, bits):
    batch, heads, rows, _ = query.shape
    return query.new_empty(batch, heads, rows, codes.shape[2] * (codes.shape[-1] * 8 // bits), dtype=torch.float32)


def _weighted_sum_fake(weights, codes, scale, zero, bits, group_size):
    return weights.new_empty(*weights.shape[:3], scale.shape[-1] * group_size, dtype=torch.float32)


def _tokens_fake(values, bits, group_size, scale_dtype=None):
    batch, heads, tokens, dim = values.shape
    scale = values.new_empty(batch, heads, tokens, dim // group_size, dtype=scale_dtype or values.dtype)
    codes = values.new_empty(batch, heads, tokens, (dim * bits + 7) // 8, dtype=torch.uint8)
    return codes, scale, torch.empty_like(scale)


def _key_groups_fake(keys, bits, group_size, scale_dtype=None):
    batch, heads, tokens, dim = keys.shape
    n = tokens // group_size
    scale = keys.new_empty(batch, heads, n, dim, dtype=scale_dtype or keys.dtype)
    codes = keys.new_empty(batch, heads, n, dim, (group_size * bits + 7) // 8, dtype=torch.uint8)
    return codes, scale, torch.empty_like(scale)


kivi_key_scores = Kernel(
    "kivi_key_scores", "(Tensor query, Tensor codes, Tensor scale, Tensor zero, int bits) -> Tensor",
    reference.kivi_key_scores, _key_scores_fake, cpu.check_kivi_key_scores, cpu.kivi_key_scores_cpu,
)  # fmt: skip
value_weighted_sum = Kernel(
    "value_weighted_sum",
    "(Tensor weights, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor",
    reference.value_weighted_sum, _weighted_sum_fake, cpu.check_value_weighted_sum, cpu.value_weighted_sum_cpu,
)  # fmt: skip
quantize_pack_tokens = Kernel(
    "quantize_pack_tokens", "(Tensor values, int bits, int group_size, ScalarType? scale_dtype=None) -> (Tensor, Tensor, Tensor)",
    reference.quantize_pack_tokens, _tokens_fake, cpu.check_quantize, cpu.quantize_pack_tokens_cpu,
    triton_kernel(__package__ + ".triton", "quantize_pack_tokens"),
)  # fmt: skip
quantize_pack_key_groups = Kernel(
    "quantize_pack_key_groups", "(Tensor keys, int bits, int group_size, ScalarType? scale_dtype=None) -> (Tensor, Tensor, Tensor)",
    reference.quantize_pack_key_groups, _key_groups_fake, cpu.check_quantize, cpu.quantize_pack_key_groups_cpu,
    triton_kernel(__package__ + ".triton", "quantize_pack_key_groups"),
)  # fmt: skip


def _kivi_decode(query, key_codes, key_scale, key_zero, key_rows, key_fp, value_codes, value_scale, value_zero,
                 value_rows, value_fp, mask, scale, key_bits, value_bits, group_size):  # fmt: skip
    """The decode step composed of KIVI's per-kernel ops (each fast or reference under the backend policy)."""
    kc, ks, kz = (x[:, :, :key_rows] for x in (key_codes, key_scale, key_zero))
    vc, vs, vz = (x[:, :, :value_rows] for x in (value_codes, value_scale, value_zero))
    scores = (lambda q: kivi_key_scores(q, kc, ks, kz, key_bits)) if key_rows else None
    return decode.reference(query, scores, key_fp, lambda w: value_weighted_sum(w, vc, vs, vz, value_bits, group_size),
                            value_rows, value_fp, mask, scale)  # fmt: skip


kivi_decode = Kernel(
    "kivi_decode",
    "(Tensor query, Tensor key_codes, Tensor key_scale, Tensor key_zero, int key_rows, Tensor[] key_fp, "
    "Tensor value_codes, Tensor value_scale, Tensor value_zero, int value_rows, Tensor[] value_fp, Tensor? mask, "
    "float scale, int key_bits, int value_bits, int group_size) -> Tensor",
    _kivi_decode, decode.fake, cpu.check_kivi_decode, cpu.kivi_decode_cpu,
    triton_kernel(__package__ + ".triton", "kivi_decode"),
)  # fmt: skip
