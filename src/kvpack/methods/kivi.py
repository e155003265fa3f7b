"""KIVI: tuning-free asymmetric 2/4-bit KV cache quantization (Liu et al., ICML 2024, arXiv 2402.02750)."""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..config import SCALE_DTYPES, MethodConfig, check_bool, check_choice, check_residual
from ..primitives import dequantize_affine, unpack_bits
from ..registry import register
from .base import BlockKeyStore, CompressedLayer, QuantizedValueStore

__all__ = ["KIVIConfig", "KIVILayer", "KIVIKeyStore"]

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

    @property
    def torch_scale_dtype(self) -> torch.dtype | None:
        return None if self.scale_dtype is None else SCALE_DTYPES[self.scale_dtype]


class KIVIKeyStore(BlockKeyStore):
    """Per-channel key groups. Storage per group of G tokens (the fused kernel's layout):
    ``codes`` (B, H, N, D, G * bits / 8) uint8, the G tokens of one channel packed LSB-first;
    ``scale`` / ``zero`` (B, H, N, D)."""

    def __init__(self, bits: int, group_size: int, residual_length: int, scale_dtype: torch.dtype | None):
        super().__init__(group_size, residual_length)
        self.bits = bits
        self.scale_dtype = scale_dtype

    def quantize_groups(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale, zero = kernels.quantize_pack_key_groups(keys, self.bits, self.group_size, self.scale_dtype)
        return {"codes": codes, "scale": scale, "zero": zero}  # (B, H, N, D, G * bits / 8), (B, H, N, D) x2

    nonnegative = ("scale",)

    def group_spec(self, batch, heads, dim, dtype, n):
        scale = ((batch, heads, n, dim), self.scale_dtype or dtype)
        codes = ((batch, heads, n, dim, self.group_size * self.bits // 8), torch.uint8)
        return {"codes": codes, "scale": scale, "zero": scale}

    def group_scores(self, query, groups):
        return kernels.kivi_key_scores(query, groups["codes"], groups["scale"], groups["zero"], self.bits)

    def dequantize_groups(self, groups):
        codes = unpack_bits(groups["codes"], self.bits, self.group_size)  # (B, H, N, D, G)
        keys = dequantize_affine(
            codes, groups["scale"].unsqueeze(-1), groups["zero"].unsqueeze(-1), self.group_size, -1
        )
        batch, heads, n, dim, group = keys.shape
        return keys.transpose(-1, -2).reshape(batch, heads, n * group, dim)


@register(KIVIConfig)
class KIVILayer(CompressedLayer):
    """One layer's KIVI store; see :class:`kvpack.methods.base.CompressedLayer` for the API."""

    def __init__(self, config: KIVIConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        scale_dtype = config.torch_scale_dtype
        self.keys = KIVIKeyStore(config.key_bits, config.group_size, config.residual_length, scale_dtype)
        self.values = QuantizedValueStore(config.value_bits, config.group_size, config.residual_length, scale_dtype)
