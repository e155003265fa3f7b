"""QJL: 1-bit quantized Johnson-Lindenstrauss key sketches (Zandieh et al., arXiv 2406.03482).

The whole method sits in this folder: config, key format and layer (here; values are KIVI's
:class:`~kvpack.methods.kivi.AffineValueFormat`), the reference math (``reference.py``), the kernel ops
(``ops.py``) and the fused CPU kernels (``cpu.cpp`` / ``cpu.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct

import torch

from ...config import (
    SCALE_DTYPES,
    MethodConfig,
    check_bool,
    check_choice,
    check_recipe_fields,
    check_residual,
)
from ...primitives import unpack_bits
from ...registry import register
from ...store import CompressedLayer, Format
from ..kivi import AffineValueFormat
from . import ops

__all__ = ["QJLConfig", "QJLLayer", "QJLKeyFormat", "qjl_sketch", "qjl_key_bits"]

QJL_VALUE_BITS = (2, 4, 8)
_SQRT_HALF_PI = math.sqrt(math.pi / 2)


@dataclasses.dataclass(frozen=True)
class QJLConfig(MethodConfig):
    """QJL (arXiv 2406.03482): keys as signs of a JL sketch plus a norm; values as in KIVI.

    A key ``k`` (of a group of G tokens whose ``outlier_channels`` largest-norm channels are set apart) is
    split into ``k_in`` (outlier channels zeroed) and ``k_out`` (the rest zeroed) and stored as
    ``sign(S k_in)`` (m bits), ``|k_in|``, ``sign(S_o k_out)`` (m_o bits) and ``|k_out|``, with S an
    (m, head_dim) random matrix and ``S_o = S[:m_o]``. The score of a query is the estimator
    ``sqrt(pi/2)/m |k_in| <S q_in, sign(S k_in)> + sqrt(pi/2)/m_o |k_out| <S_o q_out, sign(S_o k_out)>``,
    unbiased for Gaussian S. Values are quantized per token like KIVI.

    Args:
        sketch_dim: m, sketch rows (bits) per key, a positive multiple of 8.
        outlier_channels: k, channels per group of G tokens kept apart as outliers; ``0 <= k < head_dim``
            (checked at the first append). 0 is plain QJL.
        outlier_sketch_dim: m_o, sketch rows for the outlier part, a positive multiple of 8 and at most
            every layer's m. It may be 0 only when ``outlier_channels == 0``, and is then ignored (nothing
            is stored for it), so plain QJL needs only ``outlier_channels=0``.
        initial_layers: layers with ``layer_idx < initial_layers`` sketch with ``initial_sketch_dim`` rows
            (the paper gives the first layers more bits).
        initial_sketch_dim: m for those layers, a positive multiple of 8; None means ``sketch_dim``.
        value_bits: bits per value code, one of (2, 4, 8).
        group_size: G, tokens per outlier group, and channels per value scale group; must divide head_dim.
        residual_length: R, a positive multiple of G. Keys are sketched in blocks when the fp residual
            reaches R tokens; values keep exactly the last R tokens in fp.
        orthogonal: orthogonalize each block of head_dim Gaussian rows of S (scaled so rows have norm
            sqrt(head_dim)), as the reference code does; False keeps i.i.d. N(0, 1) entries.
        seed: S is a function of ``(seed, layer_idx, head_dim, m)`` only, the same on every machine.
        scale_dtype: storage dtype of key norms and value scales/zeros: "float16" (default), "bfloat16",
            "float32", or None for the input dtype.
        check_finite: reject NaN/Inf keys and values on append (costs one pass over the input).
        sink_tokens: the first S tokens of the layer are kept in full precision and never quantized (attention
            sinks, as KVQuant and RotateKV keep them); 0, the paper's method, by default.
        residual_dtype, key_centering: the fields every method shares beyond its paper, documented once in
            :func:`kvpack.config.check_recipe_fields` ("model" and "off" by default: the paper's method).

    Storage per key, head_dim d (see :func:`qjl_key_bits`): ``m + 16`` bits, plus ``m_o + 16`` when k > 0,
    plus ``8 k / G`` for the group's outlier indices (16 k / G when d > 256). The defaults (m = 256,
    k = 4, m_o = 128) cost 417 bits per key: 6.52 bits per key coordinate at d = 64, 3.26 at d = 128.
    They were chosen by measured quality on SmolLM2-135M (docs/QJL.md): the lowest attention error of
    the settings up to 6.5 bits; a small outlier sketch (m_o = 64, k = 8) nearly doubles it.

    Deviations from the paper's code: orthogonal S carries a small multiplicative score bias of
    ``sqrt(d/2) Gamma(d/2) / Gamma((d+1)/2) ~ 1 + 1/(4d)`` (+0.39% at d = 64), left uncorrected as in the
    reference; norms are stored in ``scale_dtype``; the outlier sketch reuses the first m_o rows of S
    rather than a separate matrix; outliers are chosen per group of G tokens at flush time.
    """

    method = "qjl"
    sketch_dim: int = 256
    outlier_channels: int = 4
    outlier_sketch_dim: int = 128
    initial_layers: int = 0
    initial_sketch_dim: int | None = None
    value_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    orthogonal: bool = True
    seed: int = 0
    scale_dtype: str | None = "float16"
    check_finite: bool = True
    sink_tokens: int = 0
    residual_dtype: str = "model"
    key_centering: str = "off"

    channel_packed_bits = ("value_bits",)

    def __post_init__(self) -> None:
        _check_sketch_dim("sketch_dim", self.sketch_dim)
        if self.initial_sketch_dim is not None:
            _check_sketch_dim("initial_sketch_dim", self.initial_sketch_dim)
        for name in ("outlier_channels", "initial_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        m_o = self.outlier_sketch_dim
        if self.outlier_channels == 0:  # nothing to sketch: m_o is ignored, but must still be well formed
            if m_o != 0:
                _check_sketch_dim("outlier_sketch_dim", m_o)
        else:
            _check_sketch_dim("outlier_sketch_dim", m_o, " (0 is allowed only with outlier_channels=0)")
            smallest = min(self.sketch_dim, self.initial_sketch_dim or self.sketch_dim)
            if m_o > smallest:
                raise ValueError(f"outlier_sketch_dim must be at most sketch_dim ({smallest}), got {m_o}")
        check_choice("value_bits", self.value_bits, QJL_VALUE_BITS)
        check_residual(self.group_size, self.residual_length)
        check_bool("orthogonal", self.orthogonal)
        check_bool("check_finite", self.check_finite)
        check_recipe_fields(self)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.scale_dtype is not None:
            check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))

    @property
    def torch_scale_dtype(self) -> torch.dtype | None:
        return None if self.scale_dtype is None else SCALE_DTYPES[self.scale_dtype]

    def check_head_dim(self, head_dim: int, what: str = "head_dim") -> None:
        super().check_head_dim(head_dim, what)
        if not self.outlier_channels < head_dim:
            raise ValueError(
                f"outlier_channels must be in [0, head_dim) = [0, {head_dim}), got {self.outlier_channels}"
            )

    def sketch_dim_for(self, layer_idx: int) -> int:
        """m of layer ``layer_idx``: ``initial_sketch_dim`` for the first ``initial_layers`` layers."""
        if layer_idx < self.initial_layers and self.initial_sketch_dim is not None:
            return self.initial_sketch_dim
        return self.sketch_dim


#: Largest sketch (bits per key): far past any useful size, and it keeps S's seed derivation in range.
MAX_SKETCH_DIM = 2**16


def _check_sketch_dim(name: str, value, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8{note}, got {value!r}")
    if value > MAX_SKETCH_DIM:
        raise ValueError(f"{name} must be at most {MAX_SKETCH_DIM}, got {value!r}")


def qjl_key_bits(
    head_dim: int, sketch_dim: int, outlier_channels: int, outlier_sketch_dim: int, group_size: int, norm_bits: int = 16
) -> float:
    """Stored bits per key (a whole key, not per coordinate) of a sketched token, excluding S."""
    bits = sketch_dim + norm_bits
    if outlier_channels:
        index_bits = 8 if head_dim <= 256 else 16
        bits += outlier_sketch_dim + norm_bits + outlier_channels * index_bits / group_size
    return bits


def _generator_seed(seed: int, layer_idx: int, head_dim: int, sketch_dim: int) -> int:
    # A stable function of the four integers (Python's hash() is salted per process).
    digest = hashlib.blake2b(struct.pack("<4q", seed, layer_idx, head_dim, sketch_dim), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def qjl_sketch(
    seed: int, layer_idx: int, head_dim: int, sketch_dim: int, orthogonal: bool = True, device=None
) -> torch.Tensor:
    """The JL matrix S, (sketch_dim, head_dim) float32, a deterministic function of its arguments.

    Gaussian rows are drawn on the CPU from a ``torch.Generator`` seeded by a hash of
    ``(seed, layer_idx, head_dim, sketch_dim)``, in float64 and rounded to float32: torch's float32 CPU
    sampler has an AVX2 path (polynomial log/sincos) whose draws differ in the last bit from its scalar
    path on other CPUs, while float64 draws use libm and agree far below float32 rounding. With
    ``orthogonal``, each block of ``head_dim`` consecutive rows is orthogonalized in order (Gram-Schmidt
    via QR in float64, signs fixed so that ``diag(R) > 0``, then rounded to float32) and scaled so every
    row has norm ``sqrt(head_dim)``; a last partial block is the first rows of an orthogonalized full
    block. The orthogonal S's first rows are thus the Gram-Schmidt of the non-orthogonal S's rows.
    The result is moved to ``device`` afterwards.
    """
    generator = torch.Generator(device="cpu").manual_seed(_generator_seed(seed, layer_idx, head_dim, sketch_dim))
    n_blocks = -(-sketch_dim // head_dim) if orthogonal else 0
    rows = max(sketch_dim, n_blocks * head_dim)
    gaussian = torch.randn(rows, head_dim, generator=generator, dtype=torch.float64)  # (rows, d)
    if orthogonal:
        blocks = gaussian.reshape(n_blocks, head_dim, head_dim)  # (n, d rows, d)
        q, r = torch.linalg.qr(blocks.transpose(-1, -2))  # columns of q: the orthonormalized rows
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        q = q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)
        gaussian = q.transpose(-1, -2).reshape(-1, head_dim) * math.sqrt(head_dim)
    return gaussian[:sketch_dim].float().contiguous().to(device)


class QJLKeyFormat(Format):
    """Sketched key groups. Storage per group of G tokens (the layout of :func:`ops.qjl_key_scores`):
    ``outlier_idx`` (B, H, N, k) uint8 (int16 when head_dim > 256), ``signs`` (B, H, N, G, m / 8) uint8,
    ``norms`` (B, H, N, G), ``outlier_signs`` (B, H, N, G, m_o / 8) uint8, ``outlier_norms`` (B, H, N, G);
    norms in ``scale_dtype``. With k = 0 the outlier tensors are empty and ``outlier_norms`` is not stored.
    """

    def __init__(self, config: QJLConfig, layer_idx: int) -> None:
        self.unit = config.group_size
        self.layer_idx = layer_idx
        self.sketch_dim = config.sketch_dim_for(layer_idx)
        self.outlier_channels = config.outlier_channels
        self.outlier_sketch_dim = config.outlier_sketch_dim if config.outlier_channels else 0
        self.orthogonal = config.orthogonal
        self.seed = config.seed
        self.scale_dtype = config.torch_scale_dtype
        self.sketch: torch.Tensor | None = None  # S, (m, D) float32, built by build() once D is known

    def build(self, head_dim: int) -> None:
        """Generate S for this head_dim (on the CPU; it moves to the data's device on first use)."""
        self.sketch = qjl_sketch(self.seed, self.layer_idx, head_dim, self.sketch_dim, self.orthogonal)

    def sketch_on(self, device: torch.device) -> torch.Tensor:
        if self.sketch.device != device:
            self.sketch = self.sketch.to(device)
        return self.sketch

    def _norms(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        norms = x.norm(dim=-1)  # float32
        stored = norms.to(self.scale_dtype or dtype)
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"key norms overflow {stored.dtype} (up to {norms.max().item():.3g}); store them in a wider "
                f'dtype, e.g. scale_dtype="float32"'
            )
        return stored

    def quantize(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, heads, tokens, dim = keys.shape
        sketch = self.sketch_on(keys.device)  # (m, D)
        k, m_o = self.outlier_channels, self.outlier_sketch_dim
        grouped = keys.float().reshape(batch, heads, tokens // self.unit, self.unit, dim)
        index_dtype = torch.uint8 if dim <= 256 else torch.int16
        if k:
            channel_norms = grouped.norm(dim=3)  # (B, H, N, D): each channel's norm over the group
            outlier_idx = channel_norms.topk(k, dim=-1).indices.sort(dim=-1).values  # (B, H, N, k)
            is_outlier = torch.zeros_like(channel_norms, dtype=torch.bool).scatter_(-1, outlier_idx, True)
            keys_out = grouped * is_outlier.unsqueeze(3)  # (B, H, N, G, D), inlier channels zeroed
            keys_in = grouped * ~is_outlier.unsqueeze(3)
        else:
            outlier_idx = grouped.new_zeros(batch, heads, grouped.shape[2], 0, dtype=torch.long)
            keys_out, keys_in = None, grouped
        out = {
            "outlier_idx": outlier_idx.to(index_dtype),  # (B, H, N, k)
            "signs": ops.pack_signs(keys_in @ sketch.T),  # (B, H, N, G, m / 8)
            "norms": self._norms(keys_in, keys.dtype),  # (B, H, N, G)
        }
        if k:
            sketched_out = keys_out @ sketch[:m_o].T  # (B, H, N, G, m_o)
            out["outlier_signs"] = ops.pack_signs(sketched_out)  # (B, H, N, G, m_o / 8)
            out["outlier_norms"] = self._norms(keys_out, keys.dtype)
        else:
            out["outlier_signs"] = out["signs"].new_empty(out["signs"].shape[:-1] + (0,))
        return out

    nonnegative = ("norms", "outlier_norms")

    def spec(self, batch, heads, dim, dtype, n):
        k, group, norm_dtype = self.outlier_channels, self.unit, self.scale_dtype or dtype
        norms = ((batch, heads, n, group), norm_dtype)
        spec = {
            "outlier_idx": ((batch, heads, n, k), torch.uint8 if dim <= 256 else torch.int16),
            "signs": ((batch, heads, n, group, self.sketch_dim // 8), torch.uint8),
            "norms": norms,
            "outlier_signs": ((batch, heads, n, group, self.outlier_sketch_dim // 8), torch.uint8),
        }
        if k:
            spec["outlier_norms"] = norms
        return spec

    def check(self, groups, dim):
        """Besides the base rules: each group's outlier channels are distinct, ascending and < head_dim, as
        :meth:`quantize_groups` writes them (the score kernels index the query and S with them)."""
        idx = groups.get("outlier_idx")
        if idx is not None and idx.numel():
            idx = idx.long()
            if bool((idx < 0).any()) or bool((idx >= dim).any()):
                return f"outlier_idx holds channel indices outside [0, {dim})"
            if idx.shape[-1] > 1 and not bool((idx[..., 1:] > idx[..., :-1]).all()):
                return "outlier_idx is not strictly ascending within a group"
        return super().check(groups, dim)

    def _outlier_norms(self, groups: dict[str, torch.Tensor]) -> torch.Tensor:
        if "outlier_norms" in groups:
            return groups["outlier_norms"]
        return groups["norms"].new_zeros(()).expand_as(groups["norms"])  # k = 0: unused, costs nothing

    def scores(self, query, groups):
        return ops.qjl_key_scores(
            query,
            self.sketch_on(query.device),
            groups["outlier_idx"],
            groups["signs"],
            groups["norms"],
            groups["outlier_signs"],
            self._outlier_norms(groups),
        )

    def dequantize(self, groups):
        """The unbiased (for Gaussian S) reconstruction ``sqrt(pi/2)/m |k_in| S^T sign(S k_in)`` restricted
        to the inlier channels, plus the same for the outlier part with S_o on the outlier channels.

        Restricting each part to its own channels keeps it unbiased, lowers its variance, and makes
        ``<q, k_hat>`` equal the score estimate of :meth:`group_scores` (up to float rounding).
        """
        sketch = self.sketch_on(groups["norms"].device)
        m, dim = sketch.shape
        batch, heads, n, group = groups["norms"].shape
        idx = groups["outlier_idx"].long()  # (B, H, N, k)
        is_outlier = torch.zeros(batch, heads, n, dim, dtype=torch.bool, device=sketch.device)
        is_outlier.scatter_(-1, idx, True)
        signs = unpack_bits(groups["signs"], 1, m).float() * 2 - 1  # (B, H, N, G, m)
        keys = (_SQRT_HALF_PI / m) * groups["norms"].float().unsqueeze(-1) * (signs @ sketch)  # (B, H, N, G, D)
        keys = keys * ~is_outlier.unsqueeze(3)
        m_o = groups["outlier_signs"].shape[-1] * 8
        if idx.shape[-1] and m_o:
            signs_out = unpack_bits(groups["outlier_signs"], 1, m_o).float() * 2 - 1  # (B, H, N, G, m_o)
            norms_out = groups["outlier_norms"].float().unsqueeze(-1)
            keys_out = (_SQRT_HALF_PI / m_o) * norms_out * (signs_out @ sketch[:m_o])  # (B, H, N, G, D)
            keys = keys + keys_out * is_outlier.unsqueeze(3)
        return keys.reshape(batch, heads, n * group, dim)

    def nbytes(self) -> int:
        return 0 if self.sketch is None else self.sketch.numel() * self.sketch.element_size()


@register(QJLConfig, {"QJL-128": {"sketch_dim": 128}, "QJL-256": {}})
class QJLLayer(CompressedLayer):
    """One layer's QJL store; see :class:`kvpack.store.CompressedLayer` for the API.

    ``nbytes()`` also counts the layer's sketch S (m * head_dim float32, a fixed cost per layer).
    """

    decode_op = ops.qjl_decode

    def formats(self):
        config = self.config
        values = AffineValueFormat(config.value_bits, config.group_size, config.torch_scale_dtype)
        return QJLKeyFormat(config, self.layer_idx), values

    def _decode_args(self, query, mask, scale):
        n_keys, k, key_fp = self._rows(self.keys)
        n_values, v, value_fp = self._rows(self.values)
        keys, c = self.keys.format, self.config
        return (query, keys.sketch_on(query.device), k["outlier_idx"], k["signs"], k["norms"],
                k["outlier_signs"], keys._outlier_norms(k), n_keys, key_fp, v["codes"], v["scale"],
                v["zero"], n_values, value_fp, mask, scale, c.value_bits, c.group_size)  # fmt: skip

    @property
    def sketch_dim(self) -> int:
        return self.keys.format.sketch_dim
