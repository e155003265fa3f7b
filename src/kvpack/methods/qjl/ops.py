"""QJL's kernel ops (``torch.ops.kvpack.*``); arguments and results as in :mod:`kvpack.methods.qjl.reference`."""

from __future__ import annotations

import torch

from ...kernels import Kernel, decode, triton_kernel
from ..kivi.ops import value_weighted_sum
from . import cpu, reference

__all__ = ["pack_signs", "qjl_decode", "qjl_key_scores"]


def _scores_fake(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
    batch, heads, rows, _ = query.shape
    return query.new_empty(batch, heads, rows, signs.shape[2] * signs.shape[3], dtype=torch.float32)


def _signs_fake(x):
    return x.new_empty(*x.shape[:-1], (x.shape[-1] + 7) // 8, dtype=torch.uint8)


qjl_key_scores = Kernel(
    "qjl_key_scores",
    "(Tensor query, Tensor sketch, Tensor outlier_idx, Tensor signs, Tensor norms, Tensor outlier_signs, "
    "Tensor outlier_norms) -> Tensor",
    reference.qjl_key_scores, _scores_fake, cpu.check_qjl_key_scores, cpu.qjl_key_scores_cpu,
)  # fmt: skip
pack_signs = Kernel("pack_signs", "(Tensor x) -> Tensor", reference.pack_signs, _signs_fake, cpu.check_pack_signs,
                    cpu.pack_signs_cpu)  # fmt: skip


def _qjl_decode(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms, key_rows, key_fp, value_codes,
                value_scale, value_zero, value_rows, value_fp, mask, scale, value_bits, group_size):  # fmt: skip
    """The decode step composed of QJL's key-score op and KIVI's value op (fast or reference per policy)."""
    keys = [x[:, :, :key_rows] for x in (outlier_idx, signs, norms, outlier_signs, outlier_norms)]
    vc, vs, vz = (x[:, :, :value_rows] for x in (value_codes, value_scale, value_zero))
    scores = (lambda q: qjl_key_scores(q, sketch, *keys)) if key_rows else None
    return decode.reference(query, scores, key_fp, lambda w: value_weighted_sum(w, vc, vs, vz, value_bits, group_size),
                            value_rows, value_fp, mask, scale)  # fmt: skip


qjl_decode = Kernel(
    "qjl_decode",
    "(Tensor query, Tensor sketch, Tensor outlier_idx, Tensor signs, Tensor norms, Tensor outlier_signs, "
    "Tensor outlier_norms, int key_rows, Tensor[] key_fp, Tensor value_codes, Tensor value_scale, "
    "Tensor value_zero, int value_rows, Tensor[] value_fp, Tensor? mask, float scale, int value_bits, "
    "int group_size) -> Tensor",
    _qjl_decode, decode.fake, cpu.check_qjl_decode, cpu.qjl_decode_cpu,
    triton_kernel(__package__ + ".triton", "qjl_decode"),
)  # fmt: skip
