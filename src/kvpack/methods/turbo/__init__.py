"""Rotated codebook quantization: a random rotation, then a Gaussian-optimal scalar codebook per coordinate.

The idea of the TurboQuant / PolarQuant line (Zandieh et al., arXiv 2504.19874; Han et al., arXiv
2502.02617): after a random orthogonal rotation, the coordinates of any vector are close to i.i.d.
N(0, |x|^2 / d), whatever outlier channels the vector had, so one fixed Lloyd-Max codebook for the
standard normal quantizes every coordinate near-optimally and no per-group scale/zero is needed; one
scale per token is enough. Compared with KIVI this removes the per-channel metadata (1 bit per element at
G=32 with fp16 scales) and spends it on codes.

What kvpack does, and how it deviates from the papers:
* keys and values are both stored per token as ``codes`` (b bits per rotated coordinate, packed along
  channels) and one ``scale`` (float16); reconstruction is ``R^T (scale * codebook[codes])``;
* ``scale`` is the least-squares fit ``<x_rot, c> / |c|^2`` of the rotated vector onto its codeword
  vector ``c`` (the MSE-optimal scale for that codeword), not the vector norm;
* the fp residual window and block flush rules are KIVI's (recent tokens stay exact), which the papers do
  not use;
* no QJL correction stage (TurboQuant_prod) is implemented: the MSE codebook's small inner-product
  shrinkage is what attention sees; the measured way to buy quality is more key bits (``key_bits=4,
  value_bits=2``, ``turbo-K4V2`` in docs/RESULTS.md), since keys carry most of the attention error.

Attention reads the codes directly: scores are ``scale_t * <R q, codebook[codes_t]>`` (the query is
rotated once per step) and ``P.V`` is accumulated in the rotated basis and rotated back once.

This folder holds the whole method: config, formats and layer (here), the reference math
(``reference.py``), the kernel ops (``ops.py``) and the fused CPU kernels (``cpu.cpp`` / ``cpu.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ...config import (
    SCALE_DTYPES,
    MethodConfig,
    check_bool,
    check_choice,
    check_recipe_fields,
    check_residual,
)
from ...primitives import pack_bits, random_rotation, unpack_bits
from ...registry import register
from ...store import CompressedLayer, Format
from . import ops

__all__ = ["TurboConfig", "TurboKeyFormat", "TurboLayer", "TurboValueFormat", "gaussian_codebook", "random_rotation"]

TURBO_BITS = (1, 2, 4, 8)


@functools.cache
def gaussian_codebook(bits: int, iterations: int = 300) -> tuple[float, ...]:
    """Lloyd-Max centroids for N(0, 1) with ``2**bits`` levels (sorted, symmetric).

    Computed by Lloyd's iteration on the exact density: each centroid is the conditional mean of its cell,
    ``(phi(a) - phi(b)) / (Phi(b) - Phi(a))``; each boundary the midpoint of its neighbours.
    """
    levels = 2**bits
    phi = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    centroids = [(-1 + (2 * i + 1) / levels) * 2.5 for i in range(levels)]
    for _ in range(iterations):
        bounds = [-math.inf] + [(a + b) / 2 for a, b in zip(centroids, centroids[1:])] + [math.inf]
        updated = []
        for lo, hi in zip(bounds, bounds[1:]):
            mass = cdf(hi) - cdf(lo)
            density_lo = 0.0 if lo == -math.inf else phi(lo)
            density_hi = 0.0 if hi == math.inf else phi(hi)
            updated.append((density_lo - density_hi) / mass)
        if max(abs(a - b) for a, b in zip(updated, centroids)) < 1e-12:
            centroids = updated
            break
        centroids = updated
    return tuple(centroids)


@dataclasses.dataclass(frozen=True)
class TurboConfig(MethodConfig):
    """Rotation + Gaussian-optimal scalar codebook for keys and values (see the module docstring).

    Args:
        key_bits / value_bits: codebook size 2**bits per rotated coordinate, one of (1, 2, 4, 8).
        group_size: keys are flushed in groups of this many tokens (storage granularity only: there are no
            per-group scales).
        residual_length: R, as in KIVI: keys flush in blocks of R, values keep the last R tokens in fp.
        seed: rotation seed; the rotation of layer i depends only on (seed, i, head_dim).
        scale_dtype: storage dtype of the per-token scales: "float16" (default), "bfloat16", "float32".
        check_finite: reject NaN/Inf keys and values on append.
        sink_tokens: the first S tokens of the layer are kept in full precision and never quantized (attention
            sinks, as KVQuant and RotateKV keep them); 0, the paper's method, by default.
        residual_dtype, key_centering: the fields every method shares beyond its paper, documented once in
            :func:`kvpack.config.check_recipe_fields` ("model" and "off" by default: the paper's method).
        norm_correction: which side's tokens ("off", "keys", "values", "both") scale their codeword to the
            vector's own norm instead of the least-squares fit (vLLM's "NC"; the fit shrinks every vector a
            little, which flattens softmax; measured in docs/RESULTS.md, "Ablation"). "off" by default.

    Bits per element: ``bits + 16 / head_dim`` for the quantized part (2.25 at 2 bits, head_dim 64).
    ``head_dim * bits`` must be a multiple of 8 for both widths (codes are packed along the channels), and
    ``group_size`` must divide head_dim (checked at the first append).
    """

    method = "turbo"
    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    seed: int = 0
    scale_dtype: str = "float16"
    check_finite: bool = True
    sink_tokens: int = 0
    residual_dtype: str = "model"
    key_centering: str = "off"
    norm_correction: str = "off"

    channel_packed_bits = ("key_bits", "value_bits")

    def __post_init__(self) -> None:
        check_choice("key_bits", self.key_bits, TURBO_BITS)
        check_choice("value_bits", self.value_bits, TURBO_BITS)
        check_residual(self.group_size, self.residual_length)
        check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        check_bool("check_finite", self.check_finite)
        check_recipe_fields(self)
        check_choice("norm_correction", self.norm_correction, NORM_CORRECTION)


#: What ``norm_correction`` may be.
NORM_CORRECTION = ("off", "keys", "values", "both")

#: Inputs of at most this many coordinates (a decode step's tokens) find their cells in one broadcast compare.
_BROADCAST_NEAREST = 4096


class _Codec:
    """Per-token rotated codebook quantization shared by the key and value formats."""

    def __init__(self, bits: int, rotation: torch.Tensor, scale_dtype: torch.dtype, norm_correction: bool = False):
        self.bits = bits
        self.norm_correction = norm_correction
        self.rotation = rotation  # (D, D) float32, rows are the rotated basis
        self.scale_dtype = scale_dtype
        self.dim = rotation.shape[0]
        centroids = torch.tensor(gaussian_codebook(bits), dtype=torch.float32)
        self.codebook = centroids / math.sqrt(self.dim)  # N(0, 1/D): a rotated unit vector's coordinates
        self.bounds = (self.codebook[1:] + self.codebook[:-1]) / 2

    def to(self, device: torch.device) -> None:
        if self.rotation.device != device:
            self.rotation = self.rotation.to(device)
            self.codebook = self.codebook.to(device)
            self.bounds = self.bounds.to(device)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., D) -> packed codes (..., D * bits / 8) uint8 and scale (...) in ``scale_dtype``."""
        self.to(x.device)
        rotated = x.float() @ self.rotation.T  # (..., D)
        norm = rotated.norm(dim=-1, keepdim=True)
        unit = rotated / torch.where(norm > 0, norm, torch.ones_like(norm))
        codes = self._nearest(unit)
        codewords = self.codebook[codes.long()]
        if self.norm_correction:  # the reconstruction keeps the vector's norm
            scale = norm.squeeze(-1) / codewords.norm(dim=-1)
        else:
            scale = (rotated * codewords).sum(-1) / codewords.pow(2).sum(-1)  # least-squares fit
        scale = scale.to(self.scale_dtype)
        if not torch.isfinite(scale).all():
            raise ValueError(f"a per-token scale overflows {self.scale_dtype}; use scale_dtype='float32'")
        return pack_bits(codes, self.bits, dim=-1), scale

    def _nearest(self, unit: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid, uint8: the number of cell boundaries below each coordinate.

        Up to 4 bits, 2**bits - 1 vectorized comparisons beat ``torch.bucketize``'s per-element binary search
        (4.6x at 2 bits, 1.5x at 4 bits on the CPU measured); both give the same codes, ties included. A
        decode step's few tokens take one broadcast comparison against every bound instead (one op rather
        than 2 * (2**bits - 1): 8.6 us against 25 us for a token of 3 heads at 2 bits).
        """
        if self.bits > 4:
            return torch.bucketize(unit, self.bounds).to(torch.uint8)
        if unit.numel() <= _BROADCAST_NEAREST:
            return (unit.unsqueeze(-1) > self.bounds).sum(-1, dtype=torch.uint8)
        codes = torch.zeros(unit.shape, dtype=torch.uint8, device=unit.device)
        for bound in self.bounds.tolist():
            codes += unit > bound
        return codes

    def decode_rotated(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Packed codes (..., D * bits / 8), scale (...) -> rotated reconstruction (..., D) float32."""
        self.to(codes.device)
        return self.codebook[unpack_bits(codes, self.bits, self.dim).long()] * scale.float().unsqueeze(-1)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.decode_rotated(codes, scale) @ self.rotation


class _Rotated(Format):
    """A turbo format: its :class:`_Codec` is built once head_dim is known (the rotation needs it)."""

    nonnegative = ("scale",)

    def __init__(self, bits: int, seed: int, layer_idx: int, scale_dtype: torch.dtype, norm_correction: bool = False):
        self.bits, self.seed, self.layer_idx, self.scale_dtype = bits, seed, layer_idx, scale_dtype
        self.norm_correction = norm_correction
        self.codec: _Codec | None = None

    def build(self, head_dim: int) -> None:
        rotation = random_rotation(head_dim, self.seed, self.layer_idx)
        self.codec = _Codec(self.bits, rotation, self.scale_dtype, self.norm_correction)


class TurboKeyFormat(_Rotated):
    """Keys per token: ``codes`` (B, H, N, G, D * bits / 8) uint8, ``scale`` (B, H, N, G)."""

    def __init__(self, bits: int, seed: int, layer_idx: int, scale_dtype: torch.dtype, group_size: int,
                 norm_correction: bool = False):  # fmt: skip
        super().__init__(bits, seed, layer_idx, scale_dtype, norm_correction)
        self.unit = group_size

    def quantize(self, keys):
        batch, heads, tokens, dim = keys.shape
        codes, scale = self.codec.encode(keys)
        n = tokens // self.unit
        return {
            "codes": codes.reshape(batch, heads, n, self.unit, -1),
            "scale": scale.reshape(batch, heads, n, self.unit),
        }

    def spec(self, batch, heads, dim, dtype, n):
        codes = ((batch, heads, n, self.unit, dim * self.bits // 8), torch.uint8)
        return {"codes": codes, "scale": ((batch, heads, n, self.unit), self.scale_dtype)}

    def scores(self, query, groups):
        codec = self.codec
        codec.to(query.device)
        codes = groups["codes"].flatten(2, 3)  # (B, H, N * G, D * bits / 8): a view of the grow buffer
        scale = groups["scale"].flatten(2, 3)  # (B, H, N * G)
        query_rotated = query @ codec.rotation.T  # (B, H, M, D), rotated once per step
        return ops.turbo_key_scores(query_rotated, codes, scale, codec.codebook, codec.bits)

    def dequantize(self, groups):
        batch, heads, n, group, _ = groups["codes"].shape
        return self.codec.decode(groups["codes"], groups["scale"]).reshape(batch, heads, n * group, -1)


class TurboValueFormat(_Rotated):
    """Values per token: ``codes`` (B, H, T, D * bits / 8) uint8, ``scale`` (B, H, T)."""

    def quantize(self, values):
        codes, scale = self.codec.encode(values)
        return {"codes": codes, "scale": scale}

    def spec(self, batch, heads, dim, dtype, n):
        codes = ((batch, heads, n, dim * self.bits // 8), torch.uint8)
        return {"codes": codes, "scale": ((batch, heads, n), self.scale_dtype)}

    def weighted_sum(self, weights, tokens):
        codec = self.codec
        codec.to(weights.device)
        out_rotated = ops.turbo_weighted_sum(weights, tokens["codes"], tokens["scale"], codec.codebook, codec.bits)
        return out_rotated @ codec.rotation  # (B, H, M, D): rotate back once per query row

    def dequantize(self, tokens):
        return self.codec.decode(tokens["codes"], tokens["scale"])


@register(TurboConfig, {"turbo": {}, "turbo-K4V2": {"key_bits": 4}})
class TurboLayer(CompressedLayer):
    """One layer's rotated-codebook store; the rotations are built at the first append (head_dim known)."""

    decode_op = ops.turbo_decode

    def formats(self):
        config = self.config
        scale_dtype = SCALE_DTYPES[config.scale_dtype]
        # keys and values get independent rotations (the value rotation uses the next seed)
        nc = config.norm_correction
        keys = TurboKeyFormat(config.key_bits, config.seed, self.layer_idx, scale_dtype, config.group_size,
                              nc in ("keys", "both"))  # fmt: skip
        values = TurboValueFormat(config.value_bits, config.seed + 1, self.layer_idx, scale_dtype,
                                  nc in ("values", "both"))  # fmt: skip
        return keys, values

    def _decode_args(self, query, mask, scale):
        n_keys, k, key_fp = self._rows(self.keys)
        n_values, v, value_fp = self._rows(self.values)
        keys, values = self.keys.format.codec, self.values.format.codec
        keys.to(query.device)
        values.to(query.device)
        return (query, k["codes"], k["scale"], keys.rotation, keys.codebook, n_keys, key_fp,
                v["codes"], v["scale"], values.rotation, values.codebook, n_values, value_fp, mask,
                scale, keys.bits, values.bits)  # fmt: skip
