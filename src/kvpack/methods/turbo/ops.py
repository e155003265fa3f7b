"""Turbo's kernel ops (``torch.ops.kvpack.*``); arguments and results as in :mod:`kvpack.methods.turbo.reference`."""

from __future__ import annotations

import torch

from ...kernels import Kernel, decode, triton_kernel
from . import cpu, reference

__all__ = ["turbo_decode", "turbo_key_scores", "turbo_weighted_sum"]


def _scores_fake(query_rotated, codes, scale, codebook, bits):
    return query_rotated.new_empty(*query_rotated.shape[:3], codes.shape[2], dtype=torch.float32)


def _sum_fake(weights, codes, scale, codebook, bits):
    return weights.new_empty(*weights.shape[:3], codes.shape[-1] * 8 // bits, dtype=torch.float32)


_SCHEMA = "(Tensor {}, Tensor codes, Tensor scale, Tensor codebook, int bits) -> Tensor"
turbo_key_scores = Kernel("turbo_key_scores", _SCHEMA.format("query_rotated"), reference.turbo_key_scores,
                          _scores_fake, cpu.check_turbo_key_scores, cpu.turbo_key_scores_cpu)  # fmt: skip
turbo_weighted_sum = Kernel("turbo_weighted_sum", _SCHEMA.format("weights"), reference.turbo_weighted_sum, _sum_fake,
                            cpu.check_turbo_weighted_sum, cpu.turbo_weighted_sum_cpu)  # fmt: skip


def _turbo_decode(query, key_codes, key_scale, key_rotation, key_codebook, key_rows, key_fp, value_codes, value_scale,
                  value_rotation, value_codebook, value_rows, value_fp, mask, scale, key_bits, value_bits):  # fmt: skip
    """The decode step composed of turbo's per-kernel ops (fast or reference per policy): scores in the key
    rotation's basis, the packed values' sum rotated back once."""
    kc = key_codes[:, :, :key_rows].flatten(2, 3)  # (B, H, N * G, D * bits / 8)
    ks = key_scale[:, :, :key_rows].flatten(2, 3)
    vc, vs = value_codes[:, :, :value_rows], value_scale[:, :, :value_rows]

    def scores(q):
        return turbo_key_scores(q @ key_rotation.T, kc, ks, key_codebook, key_bits)

    def weighted_sum(w):
        return turbo_weighted_sum(w, vc, vs, value_codebook, value_bits) @ value_rotation

    return decode.reference(query, scores if key_rows else None, key_fp, weighted_sum, value_rows, value_fp, mask,
                            scale)  # fmt: skip


turbo_decode = Kernel(
    "turbo_decode",
    "(Tensor query, Tensor key_codes, Tensor key_scale, Tensor key_rotation, Tensor key_codebook, int key_rows, "
    "Tensor[] key_fp, Tensor value_codes, Tensor value_scale, Tensor value_rotation, Tensor value_codebook, "
    "int value_rows, Tensor[] value_fp, Tensor? mask, float scale, int key_bits, int value_bits) -> Tensor",
    _turbo_decode, decode.fake, cpu.check_turbo_decode, cpu.turbo_decode_cpu,
    triton_kernel(__package__ + ".triton", "turbo_decode"),
)  # fmt: skip
