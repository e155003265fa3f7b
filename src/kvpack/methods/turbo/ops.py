"""Turbo's kernel ops (``torch.ops.kvpack.*``); arguments and results as in :mod:`kvpack.methods.turbo.reference`."""

from __future__ import annotations

import torch

from ...kernels import Kernel
from . import cpu, reference

__all__ = ["turbo_key_scores", "turbo_weighted_sum"]


def _scores_fake(query_rotated, codes, scale, codebook, bits):
    return query_rotated.new_empty(*query_rotated.shape[:3], codes.shape[2], dtype=torch.float32)


def _sum_fake(weights, codes, scale, codebook, bits):
    return weights.new_empty(*weights.shape[:3], codes.shape[-1] * 8 // bits, dtype=torch.float32)


_SCHEMA = "(Tensor {}, Tensor codes, Tensor scale, Tensor codebook, int bits) -> Tensor"
turbo_key_scores = Kernel("turbo_key_scores", _SCHEMA.format("query_rotated"), reference.turbo_key_scores,
                          _scores_fake, cpu.check_turbo_key_scores, cpu.turbo_key_scores_cpu)  # fmt: skip
turbo_weighted_sum = Kernel("turbo_weighted_sum", _SCHEMA.format("weights"), reference.turbo_weighted_sum, _sum_fake,
                            cpu.check_turbo_weighted_sum, cpu.turbo_weighted_sum_cpu)  # fmt: skip
