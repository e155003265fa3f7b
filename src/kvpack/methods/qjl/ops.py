"""QJL's kernel ops (``torch.ops.kvpack.*``); arguments and results as in :mod:`kvpack.methods.qjl.reference`."""

from __future__ import annotations

import torch

from ...kernels import Kernel
from . import cpu, reference

__all__ = ["pack_signs", "qjl_key_scores"]


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
