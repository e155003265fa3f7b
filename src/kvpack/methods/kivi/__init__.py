"""KIVI: tuning-free asymmetric 2/4-bit KV cache quantization (Liu et al., ICML 2024, arXiv 2402.02750).

This folder holds the whole method: the config, the key and value formats and the layer (here), the pure
torch reference math that every kernel is tested against (``reference.py``), the kernel ops with their
checks and fake shapes (``ops.py``), and the fused CPU kernels (``cpu.cpp``, called through ``cpu.py``).
The value format (:class:`AffineValueFormat`) is also QJL's.
"""

from __future__ import annotations

import dataclasses

import torch

from ...config import (
    SCALE_DTYPES,
    MethodConfig,
    check_bool,
    check_choice,
    check_recipe_fields,
    check_residual,
)
from ...primitives import dequantize_affine, unpack_bits
from ...registry import register
from ...store import CompressedLayer, Format
from . import cpu, ops

__all__ = ["AffineValueFormat", "KIVIConfig", "KIVIKeyFormat", "KIVILayer"]

KIVI_BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class KIVIConfig(MethodConfig):
    """KIVI (arXiv 2402.02750): keys quantized per channel, values per token, with an fp residual.

    Args:
        key_bits: bits per key code, one of (2, 4, 8).
        value_bits: bits per value code, one of (2, 4, 8).
        group_size: G. Keys share a scale/zero per channel over G consecutive tokens; values per token over
            G consecutive channels. Must divide head_dim, and ``G * key_bits`` must be a multiple of 8 (a
            channel's G key codes fill whole bytes).
        residual_length: R, a positive multiple of G. Keys are quantized in blocks when the fp residual
            reaches R tokens; values keep exactly the last R tokens in fp.
        scale_dtype: storage dtype of scales and zeros: "float16" (default, the paper's accounting),
            "bfloat16", "float32", or None for the input dtype.
        check_finite: reject NaN/Inf keys and values on append (costs one pass over the input).
        sink_tokens: the first S tokens of the layer are kept in full precision and never quantized (attention
            sinks, as KVQuant and RotateKV keep them); 0, the paper's method, by default.
        residual_dtype, key_centering: the fields every method shares beyond its paper, documented once in
            :func:`kvpack.config.check_recipe_fields` ("model" and "off" by default: the paper's method).
        rotate: multiply keys and values by a random orthogonal matrix (per layer) before the groups are formed,
            as llama.cpp rotates before its blocks: outlier channels are spread over all channels (measured for
            KIVI-2: KL -44% in llama.cpp's protocol but +108% in a decode-mode window, docs/RESULTS.md). The
            query is rotated once per step and the output rotated back; off by default (the paper's method).

    Deviations from the paper's code: scales are stored in ``scale_dtype`` and codes are computed from the
    rounded scale, so a kernel reading the store reconstructs exactly the reference; 8 bits is allowed.
    """

    method = "kivi"
    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    scale_dtype: str | None = "float16"
    check_finite: bool = True
    sink_tokens: int = 0
    residual_dtype: str = "model"
    key_centering: str = "off"
    rotate: bool = False

    channel_packed_bits = ("value_bits",)

    def __post_init__(self) -> None:
        check_choice("key_bits", self.key_bits, KIVI_BITS)
        check_choice("value_bits", self.value_bits, KIVI_BITS)
        check_residual(self.group_size, self.residual_length)
        if self.group_size * self.key_bits % 8:
            raise ValueError(
                f"group_size * key_bits must be a multiple of 8 (a channel's {self.group_size} key codes are packed "
                f"into whole bytes), got group_size={self.group_size}, key_bits={self.key_bits}"
            )
        if self.scale_dtype is not None:
            check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        check_bool("check_finite", self.check_finite)
        check_recipe_fields(self)
        check_bool("rotate", self.rotate)

    @property
    def torch_scale_dtype(self) -> torch.dtype | None:
        return None if self.scale_dtype is None else SCALE_DTYPES[self.scale_dtype]


class KIVIKeyFormat(Format):
    """Per-channel key groups. Storage per group of G tokens (the fused kernel's layout):
    ``codes`` (B, H, N, D, G * bits / 8) uint8, the G tokens of one channel packed LSB-first;
    ``scale`` / ``zero`` (B, H, N, D)."""

    nonnegative = ("scale",)

    def __init__(self, bits: int, group_size: int, scale_dtype: torch.dtype | None):
        self.bits = bits
        self.unit = group_size
        self.scale_dtype = scale_dtype

    def quantize(self, keys):
        codes, scale, zero = ops.quantize_pack_key_groups(keys, self.bits, self.unit, self.scale_dtype)
        return {"codes": codes, "scale": scale, "zero": zero}  # (B, H, N, D, G * bits / 8), (B, H, N, D) x2

    def spec(self, batch, heads, dim, dtype, n):
        scale = ((batch, heads, n, dim), self.scale_dtype or dtype)
        codes = ((batch, heads, n, dim, self.unit * self.bits // 8), torch.uint8)
        return {"codes": codes, "scale": scale, "zero": scale}

    def scores(self, query, rows):
        return ops.kivi_key_scores(query, rows["codes"], rows["scale"], rows["zero"], self.bits)

    def dequantize(self, rows):
        codes = unpack_bits(rows["codes"], self.bits, self.unit)  # (B, H, N, D, G)
        keys = dequantize_affine(codes, rows["scale"].unsqueeze(-1), rows["zero"].unsqueeze(-1), self.unit, -1)
        batch, heads, n, dim, group = keys.shape
        return keys.transpose(-1, -2).reshape(batch, heads, n * group, dim)


class AffineValueFormat(Format):
    """KIVI values (also QJL's): per token, asymmetric min-max in groups of ``G`` channels.

    Storage (kernel layout): ``codes`` (B, H, T_q, D * bits / 8) uint8 packed LSB-first along channels,
    ``scale`` / ``zero`` (B, H, T_q, D / G) in ``scale_dtype``; the window (B, H, <= R, D) input dtype.
    """

    nonnegative = ("scale",)

    def __init__(self, bits: int, group_size: int, scale_dtype: torch.dtype | None):
        self.bits = bits
        self.group_size = group_size
        self.scale_dtype = scale_dtype

    def quantize(self, values):
        codes, scale, zero = ops.quantize_pack_tokens(values, self.bits, self.group_size, self.scale_dtype)
        return {"codes": codes, "scale": scale, "zero": zero}  # (B, H, n, D * bits / 8), (B, H, n, D / G) x2

    def quantize_into(self, values, rows):
        return cpu.quantize_tokens_into(values, self.bits, self.group_size, self.scale_dtype, rows["codes"],
                                        rows["scale"], rows["zero"])  # fmt: skip

    def spec(self, batch, heads, dim, dtype, n):
        scale = ((batch, heads, n, dim // self.group_size), self.scale_dtype or dtype)
        return {"codes": ((batch, heads, n, dim * self.bits // 8), torch.uint8), "scale": scale, "zero": scale}

    def weighted_sum(self, weights, rows):
        return ops.value_weighted_sum(weights, rows["codes"], rows["scale"], rows["zero"], self.bits, self.group_size)

    def dequantize(self, rows):
        dim = rows["scale"].shape[-1] * self.group_size
        codes = unpack_bits(rows["codes"], self.bits, dim)
        return dequantize_affine(codes, rows["scale"], rows["zero"], self.group_size, -1)


@register(KIVIConfig, {"KIVI-4": {"key_bits": 4, "value_bits": 4}, "KIVI-2": {}})
class KIVILayer(CompressedLayer):
    """One layer's KIVI store; see :class:`kvpack.store.CompressedLayer` for the API."""

    decode_op = ops.kivi_decode

    def formats(self):
        config = self.config
        scale_dtype = config.torch_scale_dtype
        return (KIVIKeyFormat(config.key_bits, config.group_size, scale_dtype),
                AffineValueFormat(config.value_bits, config.group_size, scale_dtype))  # fmt: skip

    def _decode_args(self, query, mask, scale):
        n_keys, k, key_fp = self._rows(self.keys)
        n_values, v, value_fp = self._rows(self.values)
        c = self.config
        return (query, k["codes"], k["scale"], k["zero"], n_keys, key_fp, v["codes"], v["scale"],
                v["zero"], n_values, value_fp, mask, scale, c.key_bits, c.value_bits,
                c.group_size)  # fmt: skip
