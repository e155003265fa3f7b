"""The fused attention path: an ``AttentionInterface`` function that reads kvpack's packed store.

``kvpack.enable(model)`` registers the function (and a mask function, transformers' own ``sdpa_mask``)
under the name ``"kvpack"`` and switches that one model to it with ``model.set_attn_implementation``.
Nothing is registered or patched at import time, and other models keep their implementation.

With a :class:`~kvpack.hf.cache.KVPackCache` and the ``"kvpack"`` implementation, a quantized layer's
``update`` returns :class:`~kvpack.hf.cache.KVHandle` objects; the model passes them unchanged to the
attention function (Llama and every model written against ``AttentionInterface`` do), which computes
``store.attend(query, scale, mask)`` from the codes. Any other key (a plain tensor: a ``DynamicCache``,
skipped or sliding-window layers, no cache) goes to transformers' ``sdpa_attention_forward``.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import ATTENTION_NAME, KVHandle

__all__ = ["ATTENTION_NAME", "disable", "enable", "is_enabled", "kvpack_attention_forward", "register"]

logger = logging.getLogger(__name__)

_PREVIOUS_ATTR = "_kvpack_previous_attn_implementation"
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def kvpack_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | KVHandle,
    value: torch.Tensor | KVHandle,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a kvpack store, with transformers' attention-function signature.

    Args:
        module: the attention module (unused on the packed path).
        query: (B, H_q, T_q, D) in the model dtype; H_q a multiple of H_kv.
        key, value: two :class:`KVHandle` of one store, or (B, H_kv, T, D) tensors (then: sdpa).
        attention_mask: ``None`` (causal over the last T_q keys, or no mask for a single query), or a mask
            broadcastable to (B, H_q, T_q, T): bool (True = attend) or additive float, as ``sdpa_mask`` builds.
        dropout: must be 0 on the packed path.
        scaling: softmax scale; default ``D ** -0.5``.
        is_causal: ``False`` with no mask attends to every stored key.

    Returns:
        ``(attn_output, None)``: attn_output (B, T_q, H_q, D) in the query dtype, contiguous.

    Raises:
        NotImplementedError: dropout, softcap, sinks or position bias on the packed path, or a sliding window
            other than the store's.
        TypeError: ``key`` and ``value`` are not both tensors or both handles of one store.
    """
    if not isinstance(key, KVHandle):
        if isinstance(value, KVHandle):
            raise TypeError("key is a tensor but value is a KVHandle; both must come from the same cache layer")
        # Full-precision K/V (skipped or sliding layers, another cache, no cache): sdpa is the right path.
        _log_once(logging.DEBUG, "kvpack attention got plain key/value tensors; running sdpa for them")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if not isinstance(value, KVHandle) or value.store is not key.store:
        raise TypeError("key and value must be KVHandles of the same kvpack store")
    if dropout:
        raise NotImplementedError(
            f"kvpack attention does not support attention dropout (got {dropout}); call model.eval()"
        )
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"kvpack attention does not support {name!r} on quantized layers")
    window = kwargs.get("sliding_window")
    if window is not None and window != key.store.sliding_window:
        # A sliding layer's store knows its window (the mask and its default mask follow it); a full one does not.
        raise NotImplementedError(
            f"kvpack attention got sliding_window={window} for a store with sliding_window="
            f"{key.store.sliding_window}; build the cache with make_cache for this model"
        )
    if kwargs.get("output_attentions"):
        _log_once(logging.WARNING, "kvpack attention does not return attention weights (output_attentions is ignored)")
    store = key.store
    t_q = query.shape[2]
    if attention_mask is None and is_causal is False and t_q > 1:
        # Non-causal without a mask: every query sees every stored key (attend's default is causal).
        attention_mask = torch.ones(1, 1, t_q, store.num_tokens, dtype=torch.bool, device=query.device)
    out = store.attend(query, scale=scaling, attention_mask=attention_mask)  # (B, H_q, T_q, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``kvpack_attention_forward`` and its mask function (``sdpa_mask``) under ``"kvpack"``.

    Idempotent. Adds a name to transformers' registries; no existing implementation changes.
    """
    AttentionInterface.register(ATTENTION_NAME, kvpack_attention_forward)
    # Without a mask function of the same name, transformers builds no mask at all for custom attention.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(model):
    """Switch ``model`` to the fused path: its attention reads kvpack stores directly.

    Layers whose cache is not a kvpack store (skipped layers, ``DynamicCache``, no cache) still run sdpa,
    so an enabled model works with any cache. :func:`disable` restores the previous implementation.

    Returns:
        ``model``.

    Raises:
        ValueError: the model does not dispatch attention through transformers' ``AttentionInterface``.
    """
    register()
    current = model.config._attn_implementation
    if current != ATTENTION_NAME:
        setattr(model, _PREVIOUS_ATTR, current)
    model.set_attn_implementation(ATTENTION_NAME)
    if not is_enabled(model):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so kvpack's fused attention cannot be enabled; use the compat path (no enable call)"
        )
    return model


def disable(model):
    """Undo :func:`enable`: restore the attention implementation ``model`` had before (``"sdpa"`` if unknown).

    Returns:
        ``model``.
    """
    if is_enabled(model):
        model.set_attn_implementation(getattr(model, _PREVIOUS_ATTR, None) or "sdpa")
    if hasattr(model, _PREVIOUS_ATTR):
        delattr(model, _PREVIOUS_ATTR)
    return model


def is_enabled(model) -> bool:
    """Whether ``model`` uses the fused kvpack attention."""
    return model.config.get_text_config(decoder=True)._attn_implementation == ATTENTION_NAME
