"""Memory held by each method's cache, from the real ``nbytes()`` of filled layers.

Bytes do not depend on the values stored, so every layer (``kvpack.make_layer(config, layer_idx=i)``) is
filled with random keys/values of the model's head_dim, in appends that bring it to each requested length
in turn (a prompt of the first length, then further chunks), and ``nbytes()`` is read at each length.
Everything the layer holds counts: codes, scales, zeros, norms, outlier indices, the fp residual and value
window. The baseline is an fp16 cache, ``2 (K, V) * L * H_kv * D * 2`` bytes per layer.

Every buffer of a layer is laid out ``(B, H_kv, ...)``, so bytes are proportional to ``B * H_kv``: layers
are filled with one kv head and the count multiplied by H_kv, which is checked against a fill with all
heads at the first length (a method breaking the proportionality is then measured with all heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import MethodConfig
from ..registry import make_layer

__all__ = ["MemoryRow", "kv_shape", "memory_footprint"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """Bytes held by a whole model's cache at one context length (batch 1).

    Attributes:
        tokens: context length L.
        nbytes: bytes held by all layers.
        fp16_nbytes: bytes an fp16 cache holds for the same tokens.
        bytes_per_token: ``nbytes / L``.
        compression: ``fp16_nbytes / nbytes``.
        bits_per_element: ``8 * nbytes / (2 * layers * H_kv * L * D)``, per stored K or V element.
    """

    tokens: int
    nbytes: int
    fp16_nbytes: int
    bytes_per_token: float
    compression: float
    bits_per_element: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def kv_shape(model) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers model (or its config)."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layers, heads, head_dim


def _fill_bytes(config, layers, heads, head_dim, lengths, dtype, generator) -> list[int]:
    """Bytes held by all layers at each of the increasing ``lengths``, filling ``heads`` kv heads."""
    held = [0] * len(lengths)
    for layer_idx in range(layers):
        layer = make_layer(config, layer_idx=layer_idx)
        for i, tokens in enumerate(lengths):
            new = tokens - layer.num_tokens
            keys = torch.randn(1, heads, new, head_dim, generator=generator).to(dtype)
            values = torch.randn(1, heads, new, head_dim, generator=generator).to(dtype)
            layer.append(keys, values)
            held[i] += layer.nbytes()
    return held


@torch.no_grad()
def memory_footprint(
    config: MethodConfig | None,
    lengths: Sequence[int],
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: str = "float16",
    seed: int = 0,
    layer_configs: Mapping[int, MethodConfig] | None = None,
    skip_layers: Sequence[int] = (),
    cycle: int = 1,
) -> list[MemoryRow]:
    """Bytes held at each context length in ``lengths`` by a ``layers``-layer cache of ``config``.

    Args:
        config: a method config; None is the fp16 baseline (compression 1, 16 bits).
        layer_configs, skip_layers: per-layer settings (a preset's): these layers' own configs, and layers
            held unquantized in ``dtype``.
        cycle: measure each length L at ``cycle`` lengths spread over one key flush cycle, L + k R / cycle
            (k < cycle; R the config's residual_length), and report the mean: the key residual holds
            0..R-1 tokens depending on where L falls, which a single length reports for one phase only (a row
            with attention sinks, shifted by S tokens, would otherwise compare at another phase).
        lengths: context lengths L (any order; each is measured).
        layers, kv_heads, head_dim: the model's cache shape (see :func:`kv_shape`).
        dtype: dtype of the keys/values fed in, which is also the dtype of the fp residual: one of
            "float16", "bfloat16", "float32".
        seed: seed of the synthetic keys/values.

    Returns:
        One :class:`MemoryRow` per length, in the order of ``lengths``.

    Raises:
        ValueError: unknown ``dtype`` or a non-positive length.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1:
        raise ValueError(f"cycle must be a positive integer, got {cycle!r}")
    ordered = sorted(set(lengths))
    generator = torch.Generator().manual_seed(seed)
    if config is None:
        held = {tokens: layers * 2 * kv_heads * tokens * head_dim * 2 for tokens in ordered}
    elif cycle > 1:  # the mean bytes per token over the cycle's phases, at each length
        step = max(1, config.residual_length // cycle)
        held = {}
        for tokens in ordered:
            phases = memory_footprint(config, [tokens + k * step for k in range(cycle)], layers=layers,
                                      kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, seed=seed,
                                      layer_configs=layer_configs, skip_layers=skip_layers)  # fmt: skip
            held[tokens] = round(tokens * sum(r.bytes_per_token for r in phases) / cycle)
    elif layer_configs or skip_layers:  # per layer: each distinct config's layer bytes, times its layers
        torch_dtype = _DTYPES[dtype]
        per_layer = [None if i in skip_layers else (layer_configs or {}).get(i, config) for i in range(layers)]
        held = dict.fromkeys(ordered, 0)
        for layer_config in set(per_layer):
            n = per_layer.count(layer_config)
            if layer_config is None:
                counts = [2 * kv_heads * t * head_dim * torch_dtype.itemsize for t in ordered]
            else:
                counts = _fill_bytes(layer_config, 1, kv_heads, head_dim, ordered, torch_dtype, generator)
            for tokens, count in zip(ordered, counts):
                held[tokens] += n * count
    else:
        torch_dtype = _DTYPES[dtype]
        per_head = _fill_bytes(config, 1, 1, head_dim, ordered[:1], torch_dtype, generator)[0]
        all_heads = _fill_bytes(config, 1, kv_heads, head_dim, ordered[:1], torch_dtype, generator)[0]
        if all_heads == kv_heads * per_head:
            counts = [kv_heads * n for n in _fill_bytes(config, layers, 1, head_dim, ordered, torch_dtype, generator)]
        else:
            counts = _fill_bytes(config, layers, kv_heads, head_dim, ordered, torch_dtype, generator)
        held = dict(zip(ordered, counts))
    rows = []
    for tokens in lengths:
        fp16 = layers * 2 * kv_heads * tokens * head_dim * 2
        rows.append(
            MemoryRow(
                tokens=tokens,
                nbytes=held[tokens],
                fp16_nbytes=fp16,
                bytes_per_token=held[tokens] / tokens,
                compression=fp16 / held[tokens],
                bits_per_element=8 * held[tokens] / (2 * layers * kv_heads * tokens * head_dim),
            )
        )
    return rows
