"""The calls into transformers that the commands and the evaluation make, spelled once.

transformers' cache API moves between releases (5.24 renamed ``past_key_values=`` to ``cache=`` and
warns on the old name); every forward pass, fp cache and baseline ``QuantizedCache`` that kvpack's own
code builds goes through this module, so a rename is fixed here and nowhere else.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache, QuantizedCache, TextStreamer
from transformers.modeling_outputs import CausalLMOutputWithPast

#: The cache keyword of this transformers release: ``cache`` from 5.24, ``past_key_values`` before (the GPU
#: machine this project is measured on has 5.17; kvpack's tests cover the pinned 5.24).
CACHE_KWARG = "cache" if "cache" in inspect.signature(CausalLMOutputWithPast).parameters else "past_key_values"

__all__ = [
    "cache_nbytes",
    "dynamic_cache",
    "forward",
    "generate",
    "quantized_cache",
    "quantized_layer",
    "quantized_layer_attention",
    "text_streamer",
]

QUANTIZED_BACKENDS = ("quanto", "hqq")


def forward(
    model, input_ids: torch.Tensor, cache=None, *, logits_to_keep: int = 0, **kwargs: Any
) -> tuple[Any, torch.Tensor]:
    """One forward pass of a causal LM through ``cache`` (None: the model builds a ``DynamicCache``).

    Args:
        input_ids: (B, T) int64.
        cache: a transformers ``Cache`` (a kvpack cache, a ``DynamicCache``, a ``QuantizedCache``) or None.
        logits_to_keep: compute logits for the last this many positions only (0: all positions).
        **kwargs: passed on (``attention_mask``, ``position_ids``, ...).

    Returns:
        ``(cache, logits)``: the cache after the step and the logits, (B, T or logits_to_keep, V).
    """
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep, **{CACHE_KWARG: cache}, **kwargs)
    held = getattr(out, "cache", None)
    if held is None:  # releases before the ``cache`` rename return ``past_key_values``
        held = getattr(out, "past_key_values", None)
    return held, out.logits


def generate(model, cache=None, **kwargs: Any) -> torch.Tensor:
    """``model.generate(**kwargs)`` with ``cache`` passed under the current spelling; the output ids."""
    return model.generate(**{CACHE_KWARG: cache}, **kwargs)


def dynamic_cache(model) -> DynamicCache:
    """An empty fp ``DynamicCache`` laid out for ``model``."""
    return DynamicCache(config=model.config)


def _check_backend(backend: str) -> None:
    if backend not in QUANTIZED_BACKENDS:
        raise ValueError(f"backend must be one of {QUANTIZED_BACKENDS}, got {backend!r}")


def quantized_cache(model, backend: str = "quanto", nbits: int = 2, group_size: int = 64, residual_length: int = 128):
    """transformers' own ``QuantizedCache`` (the baseline kvpack is measured against).

    Raises:
        ValueError: an unknown ``backend``.
        ImportError: the backend's package (optimum-quanto, hqq) is not installed.
    """
    _check_backend(backend)
    return QuantizedCache(backend, model.config, nbits=nbits, q_group_size=group_size, residual_length=residual_length)


def quantized_layer(backend: str, keys: torch.Tensor, values: torch.Tensor, nbits: int = 2, group_size: int = 64,
                    residual_length: int = 128):  # fmt: skip
    """One ``QuantizedCache`` layer holding ``keys``/``values`` (B, H, T, D), in the state after a decode step.

    All tokens but the last are quantized (the prompt); the last one stays in the fp residual.

    Raises:
        ValueError: an unknown ``backend``.
        ImportError: the backend's package is not installed.
    """
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    _check_backend(backend)
    cls = QuantoQuantizedLayer if backend == "quanto" else HQQQuantizedLayer
    layer = cls(nbits=nbits, axis_key=0, axis_value=0, q_group_size=group_size, residual_length=residual_length)
    layer.update(keys[:, :, :-1], values[:, :, :-1])
    layer.update(keys[:, :, -1:], values[:, :, -1:])
    return layer


def quantized_layer_attention(layer, query: torch.Tensor) -> torch.Tensor:
    """What a ``QuantizedCache`` decode step computes: dequantize the whole store, add the residual, SDPA."""
    keys = torch.cat([layer._dequantize(layer._quantized_keys), layer.keys], dim=-2)
    values = torch.cat([layer._dequantize(layer._quantized_values), layer.values], dim=-2)
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)


def cache_nbytes(cache) -> int:
    """Bytes a cache holds: ``cache.nbytes()`` for kvpack caches; for transformers' caches, the fp tensors
    plus every part (codes, scales, shifts) of ``QuantizedCache`` layers' quantized stores."""
    nbytes = getattr(cache, "nbytes", None)
    if callable(nbytes):
        return nbytes()
    return sum(layer_nbytes(layer) for layer in cache.layers)


def layer_nbytes(layer) -> int:
    """Bytes one transformers cache layer holds: its fp tensors and its quantized stores' parts."""
    total = 0
    for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
        total += sum(t.numel() * t.element_size() for t in _tensor_parts(getattr(layer, name, None)))
    return total


def _tensor_parts(obj) -> list[torch.Tensor]:
    """The plain tensors inside ``obj``: itself, or a quanto QTensor's data/scale/shift (recursively)."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor) and not hasattr(obj, "_data"):
        return [obj]
    return [part for attr in ("_data", "_scale", "_shift") for part in _tensor_parts(getattr(obj, attr, None))]


def text_streamer(tokenizer) -> TextStreamer:
    """A streamer that prints generated text (not the prompt) as ``generate`` produces it."""
    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
