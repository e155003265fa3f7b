"""Plumbing shared by the model-level suites: one fp prefill, copied into each method's cache, then decode.

Why the prefill is shared: every kvpack method attends exactly during prefill (the tokens an ``append``
flushes stay visible in full precision to that same step, :mod:`kvpack.store`), so each layer of a
compressed model receives the same keys and values as the fp model. Running the prefill once with a
``DynamicCache`` and appending its per-layer keys/values to a fresh compressed cache (``cache.update``, the
call the attention layers make) therefore leaves the cache in the state a prefill through it would, at a
fraction of the cost. Every token after the prefill goes through the compressed cache for real.
``tests/test_eval.py`` checks the equivalence for every registered method; ``share_prefill=False`` in the
suites runs each method's own prefill instead.

Nothing here imports transformers: the fp cache is the one the model builds itself, and fresh fp caches
are built with its type.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "CacheFactory",
    "ProgressBar",
    "cache_tensors",
    "fill_cache",
    "forward_last",
    "fresh_cache",
    "progress_bar",
    "returned_cache",
]

#: ``factory(model)`` -> a transformers ``Cache`` to pass as ``cache=``, or ``None`` for the model's own
#: fp ``DynamicCache``.
CacheFactory = Callable[[Any], Any]


@torch.no_grad()
def forward_last(model, input_ids: torch.Tensor, cache=None) -> tuple[Any, torch.Tensor]:
    """Run ``input_ids`` (B, T) int64 through ``model`` with ``cache`` (None: the model builds a DynamicCache).

    Returns:
        ``(cache, logits)``: the cache after the step and the logits of the last position, (B, V) float32.
    """
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return returned_cache(out), out.logits[:, -1].float()


def returned_cache(out) -> Any:
    """The cache a forward pass's output holds (``cache``; ``past_key_values`` before the rename)."""
    held = getattr(out, "cache", None)
    return held if held is not None else getattr(out, "past_key_values", None)


def cache_tensors(cache, num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer ``(keys, values)``, each (B, H_kv, num_tokens, D), of an fp cache after a prefill.

    Returns None when some layer does not hold exactly ``num_tokens`` plain tensors (a sliding-window
    layer, for instance): the prefill then cannot be shared and each method runs its own.
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    out = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)) or keys.shape[2] != num_tokens:
            return None
        out.append((keys, values))
    return out


def full_layers(cache, num_tokens: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``layer index -> (keys, values)`` of the layers of an fp cache that hold all ``num_tokens`` positions as
    plain tensors and do not slide (the full-attention layers)."""
    out = {}
    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.shape[2] == num_tokens
                and not getattr(layer, "is_sliding", False)):  # fmt: skip
            out[i] = (keys, values)
    return out


def fresh_cache(model, factory: CacheFactory | None, fp_cache_type: type) -> Any:
    """A new empty cache: ``factory(model)``, or, when that is None, ``fp_cache_type(config=model.config)``
    (the type of the cache the model built itself, i.e. ``DynamicCache``)."""
    cache = factory(model) if factory is not None else None
    if cache is None:
        cache = fp_cache_type(config=model.config)
    return cache


@torch.no_grad()
def fill_cache(cache, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Append per-layer prefill keys/values to an empty cache, as the model's attention layers would."""
    for layer_idx, (keys, values) in enumerate(tensors):
        cache.update(keys, values, layer_idx)


class ProgressBar:
    """A no-op stand-in for ``tqdm`` when progress is off (tqdm is then not needed)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when ``enabled``, else a no-op bar.

    Raises:
        ImportError: ``enabled`` and tqdm is missing (``pip install 'kvpack[eval]'``).
    """
    if not enabled:
        return ProgressBar()
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError("progress bars need tqdm: pip install 'kvpack[eval]'") from err
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
