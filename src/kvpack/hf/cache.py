"""A ``transformers.Cache`` whose full-attention and sliding-window layers are kvpack stores.

:func:`make_cache` builds a :class:`KVPackCache` for a model: one :class:`KVPackLayer` (a
``CacheLayerMixin`` wrapping ``kvpack.make_layer(config, layer_idx)``) per full-attention layer and per
sliding-window layer (a store that drops the tokens that left the window, with transformers' mask
semantics), and the layers transformers' own ``DynamicCache(config=...)`` would build everywhere else
(chunked, linear-attention and KV-sharing layers stay unquantized), plus transformers' plain layers for the
layers named in ``skip_layers``.

What ``update`` returns depends on the model's attention implementation, read at every call:

* compat (any attention implementation): the layer appends, then returns ``materialize()``, the
  dequantized K/V (tokens flushed by this very append in full precision) in the model dtype;
* fused (after :func:`kvpack.hf.enable`): the layer appends, then returns two :class:`KVHandle` objects
  that the ``"kvpack"`` attention function turns into ``layer.attend(query, ...)``, reading the packed
  store without materializing dequantized K/V.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping

import torch
from transformers import Cache, DynamicCache, DynamicLayer
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from ..config import MethodConfig
from ..errors import CacheFileError
from ..registry import config_class, make_layer
from ..store import CompressedLayer, _is_count

__all__ = ["ATTENTION_NAME", "KVHandle", "KVPackCache", "KVPackLayer", "load_cache", "make_cache", "save_cache"]

logger = logging.getLogger(__name__)

#: Name under which the fused attention (and its mask) are registered with transformers.
ATTENTION_NAME = "kvpack"


class KVHandle:
    """What a fused-mode ``update`` returns instead of a key or value tensor: a reference to the store.

    Only the ``"kvpack"`` attention function consumes it (through ``store.attend``). ``shape`` and
    ``dtype`` describe the tensor it stands for, ``(B, H_kv, T, D)`` in the model dtype, for code that
    only inspects them; :meth:`materialize` builds that tensor (slow path, for debugging).
    """

    __slots__ = ("store", "part")

    def __init__(self, store: CompressedLayer, part: str) -> None:
        if part not in ("keys", "values"):
            raise ValueError(f"part must be one of ('keys', 'values'), got {part!r}")
        self.store = store
        self.part = part

    @property
    def shape(self) -> torch.Size:
        batch, heads, dim = self.store.shape
        return torch.Size((batch, heads, self.store.num_tokens, dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype

    def materialize(self) -> torch.Tensor:
        """The dequantized tensor attention reads this step, (B, H_kv, T, D) in the model dtype."""
        keys, values = self.store.materialize()
        return keys if self.part == "keys" else values

    def __repr__(self) -> str:
        return f"KVHandle({self.part}, shape={tuple(self.shape)}, layer_idx={self.store.layer_idx})"


class KVPackLayer(CacheLayerMixin):
    """One attention layer's cache: a kvpack :class:`~kvpack.store.CompressedLayer` behind transformers'
    ``CacheLayerMixin`` API.

    Args:
        method_config: the method config, e.g. ``kvpack.KIVIConfig(key_bits=4)``.
        layer_idx: index of the attention layer (methods may seed per-layer state from it).
        sliding_window: W for a sliding-window layer (as transformers' ``DynamicSlidingWindowLayer``: the query
            at position p reads positions p - W + 1 .. p), else None. Its store drops the tokens no later query
            reads in whole units of ``drop_unit`` tokens, so it holds between W - 1 and W - 2 + drop_unit tokens
            (transformers' own holds W - 1); :meth:`get_mask_sizes` says which.
        drop_unit: the tokens dropped at a time; every sliding layer of a cache shares one (transformers builds
            one mask for all of them).

    ``crop`` is supported (assisted decoding) but is not a perfect rollback once tokens were quantized: a
    quantized key group cut in the middle returns to the fp residual as its reconstruction.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, method_config: MethodConfig, layer_idx: int, sliding_window: int | None = None,
                 drop_unit: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.method_config = method_config
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.store: CompressedLayer = self._new_store(drop_unit)

    def _new_store(self, drop_unit: int | None) -> CompressedLayer:
        return make_layer(self.method_config, layer_idx=self.layer_idx, sliding_window=self.sliding_window,
                          drop_unit=drop_unit)  # fmt: skip

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def adopt(self, store: CompressedLayer, device: torch.device) -> None:
        """Hold ``store``, filled elsewhere (a loaded cache), as this layer's state."""
        if store.layer_idx != self.layer_idx:
            raise ValueError(f"a store of layer {store.layer_idx} cannot fill layer {self.layer_idx}")
        if (store.sliding_window, store.drop_unit) != (self.sliding_window, self.store.drop_unit):
            raise ValueError(
                f"a store with sliding_window={store.sliding_window}, drop_unit={store.drop_unit} cannot fill a layer "
                f"with sliding_window={self.sliding_window}, drop_unit={self.store.drop_unit}"
            )
        self.store = store
        self.device, self.dtype = torch.device(device), store.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, handles: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[KVHandle, KVHandle]:
        """Append ``key_states`` / ``value_states`` (B, H_kv, T_new, D) and return what attention reads.

        Returns:
            ``handles=False``: (keys, values), each (B, H_kv, T, D) in the input dtype, dequantized, with the
            tokens flushed by this append in full precision. ``handles=True``: two :class:`KVHandle`.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        if handles:
            return KVHandle(self.store, "keys"), KVHandle(self.store, "values")
        return self.store.materialize()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask for ``query_length`` new tokens: the tokens the next ``update``
        returns (every held one, less those a sliding-window store drops first) and the position of the first."""
        drop = self.store.pending_drop()
        return self.store.num_tokens - drop + query_length, self.store.num_dropped + drop

    def get_seq_length(self) -> int:
        """Tokens seen (a sliding-window layer holds only the last of them)."""
        return self.store.seq_length

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        """Drop every token (a fresh store; the next ``update`` starts over)."""
        self.store = self._new_store(self.store.drop_unit)  # None for a full-attention layer
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative int, as ``DynamicLayer.crop``); 0 is a no-op.

        Raises:
            ValueError: ``tokens_to_remove`` is positive (transformers' legacy "final length" meaning).
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove} "
                "(the positive 'final length' form is not supported, as in DynamicLayer)"
            )
        if tokens_to_remove < 0 and self.store.num_tokens:
            self.store.crop(max(self.store.num_tokens + tokens_to_remove, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows for beam search."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep / reorder batch rows: ``indices`` a 1-D long tensor (or a boolean row mask)."""
        if self.store.num_tokens == 0:
            return
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self.store.select_batch(indices.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times, as ``Tensor.repeat_interleave(repeats, dim=0)``."""
        if self.store.num_tokens:
            self.store.repeat_batch(repeats)

    def offload(self):
        raise NotImplementedError("KVPackLayer does not support offloading")

    def prefetch(self):
        raise NotImplementedError("KVPackLayer does not support offloading")

    def nbytes(self) -> int:
        """Bytes held by the store (codes, scales, zeros, fp residual)."""
        return self.store.nbytes()

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 ``DynamicLayer`` would hold for the same tokens."""
        if self.store.num_tokens == 0:
            return 0
        batch, heads, dim = self.store.shape
        return 2 * batch * heads * self.store.num_tokens * dim * 2  # K and V, 2 bytes each

    def __repr__(self) -> str:
        return f"KVPackLayer({self.store!r})"


def _fp_layer_nbytes(layer) -> tuple[int, int]:
    """(bytes held, fp16 bytes) of a transformers layer that stores plain ``keys`` / ``values`` tensors."""
    held = fp16 = 0
    for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(tensor, torch.Tensor):
            held += tensor.numel() * tensor.element_size()
            fp16 += tensor.numel() * 2
    return held, fp16


class KVPackCache(Cache):
    """A ``transformers.Cache`` with a kvpack store in each full-attention and sliding-window layer.

    Pass it to ``model.generate(..., cache=...)`` or to a manual forward loop (``model(..., cache=...)``);
    ``past_key_values=`` still works in transformers 5.24 but is deprecated there. Prefer :func:`make_cache`.

    Args:
        config: the model's config (its decoder text config is used).
        method_config: the kvpack method config of every quantized layer not in ``layer_configs``.
        skip_layers: layer indices kept in full precision (a plain ``DynamicLayer``).
        layer_configs: layer index -> the config of that layer (per-layer precision: e.g. more bits for the
            layers that are most sensitive); any method, each checked against the model's head_dim.

    Raises:
        ValueError: a ``skip_layers`` or ``layer_configs`` index is out of range, a layer both skipped and
            configured, or a config whose ``group_size`` does not divide head_dim.
        TypeError: a ``layer_configs`` value that is not a kvpack MethodConfig.
    """

    def __init__(self, config, method_config: MethodConfig, skip_layers: Iterable[int] = (),
                 layer_configs: Mapping[int, MethodConfig] | None = None) -> None:  # fmt: skip
        if not isinstance(method_config, MethodConfig):
            raise TypeError(f"method_config must be a kvpack MethodConfig, got {type(method_config).__name__}")
        text_config = config.get_text_config(decoder=True)
        # transformers' own layer dispatch (sliding, chunked, linear, KV sharing) gives the unquantized layers.
        layers = DynamicCache(config=text_config).layers
        skip = set(skip_layers)
        per_layer = dict(layer_configs or {})
        for name, indices in (("skip_layers", skip), ("layer_configs", per_layer)):
            bad = sorted(i for i in indices if type(i) is not int or not 0 <= i < len(layers))
            if bad:
                raise ValueError(f"{name} must be layer indices in [0, {len(layers)}), got {bad}")
        if skip & set(per_layer):
            raise ValueError(f"layers {sorted(skip & set(per_layer))} are both skipped and given a config")
        for i, layer_config in per_layer.items():
            if not isinstance(layer_config, MethodConfig):
                raise TypeError(f"layer_configs[{i}] must be a kvpack MethodConfig, got {type(layer_config).__name__}")
        for layer_config in {method_config, *per_layer.values()}:
            _check_head_dim(text_config, layer_config)
        sliding = {i: layer.sliding_window for i, layer in enumerate(layers)
                   if type(layer) is DynamicSlidingWindowLayer and i not in skip}  # fmt: skip
        sliding_configs = {i: _sliding_config(per_layer.get(i, method_config)) for i in sliding}
        unsunk = [i for i in sliding if sliding_configs[i] != per_layer.get(i, method_config)]
        if unsunk and tuple(unsunk) not in _LOGGED_UNSUNK:  # once per layer pattern, not per cache
            _LOGGED_UNSUNK.add(tuple(unsunk))
            logger.info("sliding-window layers %s keep no sink tokens (their first tokens leave the window)", unsunk)
        # One drop unit for every sliding layer: transformers builds one mask for all of them.
        drop_unit = math.lcm(*(make_layer(c).row_unit for c in set(sliding_configs.values()))) if sliding else None
        for i, layer in enumerate(layers):
            # Exactly DynamicLayer or DynamicSlidingWindowLayer: other kinds (chunked, indexed, linear) keep theirs.
            if type(layer) is DynamicLayer and i not in skip:
                layers[i] = KVPackLayer(per_layer.get(i, method_config), layer_idx=i)
            elif i in sliding:
                layers[i] = KVPackLayer(sliding_configs[i], layer_idx=i, sliding_window=sliding[i], drop_unit=drop_unit)
        if not any(isinstance(layer, KVPackLayer) for layer in layers):
            logger.warning("no layer of this model is quantized (all skipped or not attention)")
        super().__init__(layers=layers)
        self.method_config = method_config
        self.skip_layers = tuple(sorted(skip))
        self.layer_configs = {i: per_layer[i] for i in sorted(per_layer)}
        self._text_config = text_config

    def config_of(self, layer_idx: int) -> MethodConfig:
        """The method config of quantized layer ``layer_idx`` (a sliding-window layer's keeps no sinks)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, KVPackLayer):
            return layer.method_config
        return self.layer_configs.get(layer_idx, self.method_config)

    def __deepcopy__(self, memo):
        # A copy (e.g. a reused prompt cache) follows the same model: share its config instead of copying it,
        # so that `fused` keeps tracking the model's attention implementation.
        memo[id(self._text_config)] = self._text_config
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        return new

    @property
    def fused(self) -> bool:
        """Whether ``update`` returns handles: the model's attention implementation is ``"kvpack"``."""
        return getattr(self._text_config, "_attn_implementation", None) == ATTENTION_NAME

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[KVHandle, KVHandle]:
        """Store the new tokens of layer ``layer_idx`` and return what its attention reads (see module doc)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, KVPackLayer):
            return layer.update(key_states, value_states, handles=self.fused)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes held by every layer: kvpack stores plus the fp tensors of unquantized layers."""
        total = 0
        for layer in self.layers:
            total += layer.nbytes() if isinstance(layer, KVPackLayer) else _fp_layer_nbytes(layer)[0]
        return total

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 ``DynamicCache`` would hold for the same tokens (the comparison baseline)."""
        total = 0
        for layer in self.layers:
            total += layer.fp16_nbytes() if isinstance(layer, KVPackLayer) else _fp_layer_nbytes(layer)[1]
        return total

    def __repr__(self) -> str:
        kinds = [type(layer).__name__ for layer in self.layers]
        per_layer = f", layer_configs={self.layer_configs}" if self.layer_configs else ""
        return (f"KVPackCache(method_config={self.method_config}{per_layer}, layers={kinds}, "
                f"tokens={self.get_seq_length()})")  # fmt: skip


_LOGGED_UNSUNK: set[tuple[int, ...]] = set()


def _sliding_config(config: MethodConfig) -> MethodConfig:
    """A sliding-window layer's config: sinks leave the window like any other token, so none are kept."""
    return config.replace(sink_tokens=0) if getattr(config, "sink_tokens", 0) else config


def _head_dim(text_config) -> int | None:
    head_dim = getattr(text_config, "head_dim", None)
    if head_dim:
        return head_dim
    hidden, heads = getattr(text_config, "hidden_size", None), getattr(text_config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def _check_head_dim(text_config, method_config: MethodConfig) -> None:
    head_dim = _head_dim(text_config)
    if head_dim:
        method_config.check_head_dim(head_dim, "the model's head_dim")


def make_cache(
    model,
    method_config: MethodConfig | str = "kivi",
    *,
    skip_layers: Iterable[int] = (),
    layer_configs: Mapping[int, MethodConfig] | None = None,
    **overrides,
) -> KVPackCache:
    """A fresh :class:`KVPackCache` for ``model``, to pass as ``cache=`` to ``generate`` or ``forward``.

    Args:
        model: a transformers model (or its config).
        method_config: a kvpack method config, a method name (``kvpack.method_names()``) for its defaults, or a
            preset name (``kvpack.presets.names()``: a config with its per-layer settings).
        skip_layers: layer indices kept in full precision (added to a preset's).
        layer_configs: layer index -> config for that layer (per-layer precision; over a preset's).
        **overrides: config fields to change, e.g. ``key_bits=4, residual_length=64`` (of ``method_config``;
            of every config of a preset, e.g. ``make_cache(model, "kv3", residual_dtype="float16")``).

    Returns:
        A :class:`KVPackCache`; the model attends through the packed store after :func:`kvpack.hf.enable`.

    Raises:
        ValueError: unknown method name or config field, invalid field value, bad ``skip_layers``.
    """
    config = getattr(model, "config", model)
    if isinstance(method_config, str):
        from ..presets import PRESETS

        if method_config in PRESETS:
            preset = PRESETS[method_config]
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
            own = {i: _overridden(c, overrides) for i, c in preset.layer_configs(num_layers).items()}
            layer_configs = {**own, **(layer_configs or {})}
            skip_layers = sorted(set(skip_layers) | set(preset.skip_layers(num_layers)))
            base = _overridden(preset.config, overrides)
            return KVPackCache(config, base, skip_layers=skip_layers, layer_configs=layer_configs)
        method_config = config_class(method_config)()
    if not isinstance(method_config, MethodConfig):
        raise TypeError(
            f"method_config must be a kvpack MethodConfig or a method name, got {type(method_config).__name__}"
        )
    method_config = _overridden(method_config, overrides)
    return KVPackCache(config, method_config, skip_layers=skip_layers, layer_configs=layer_configs)


def _overridden(method_config: MethodConfig, overrides: dict) -> MethodConfig:
    """``method_config`` with ``overrides`` (config fields) applied, validated; unknown fields raise."""
    if not overrides:
        return method_config
    known = {f for f in method_config.to_dict() if f != "method"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown {type(method_config).__name__} fields {unknown}; allowed: {sorted(known)} (and skip_layers)"
        )
    return method_config.replace(**overrides)


# --- saved caches ---------------------------------------------------------------------------------------
_CACHE_KIND = "kvpack-cache-v1"


def _layer_shape(text_config) -> dict:
    """What a saved cache must agree on with the model it is loaded into."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    if getattr(text_config, "new_decoder_architecture", False):  # Falcon caches its kv heads broadcast to all
        heads = text_config.num_attention_heads
    return {"num_layers": text_config.num_hidden_layers, "num_kv_heads": heads, "head_dim": _head_dim(text_config)}


def save_cache(cache: KVPackCache, path) -> None:
    """Write a filled :class:`KVPackCache` to ``path`` (one safetensors file, written atomically).

    The packed codes, scales and fp residuals are saved as stored (no re-quantization), and unquantized
    (``skip_layers``) layers as their fp tensors; :func:`load_cache` restores a cache that continues exactly
    as this one would (prompt caching: prefill a long document once, answer many questions later).

    Raises:
        TypeError: ``cache`` is not a KVPackCache.
        ValueError: the cache holds no tokens, or a layer kind it cannot save (sliding window, ...).
    """
    from ..io import save_layers

    if not isinstance(cache, KVPackCache):
        raise TypeError(f"save_cache takes a KVPackCache, got {type(cache).__name__}")
    if cache.get_seq_length() == 0:
        raise ValueError("the cache holds no tokens; run a prefill through it before saving")
    slots, skip = [], []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, KVPackLayer):
            slots.append(layer.store)
        elif type(layer) is DynamicLayer and layer.is_initialized:
            slots.append((layer.keys, layer.values))
            skip.append(i)
        else:
            raise ValueError(
                f"layer {i} is a {type(layer).__name__}; only kvpack and full DynamicLayer layers are saved"
            )
    extra = {
        "kind": _CACHE_KIND,
        "method_config": cache.method_config.to_dict(),
        "skip_layers": skip,
        "model": _layer_shape(cache._text_config),
    }
    shard = _saved_shard(slots, extra["model"]["num_kv_heads"])
    if shard is not None:  # (absent otherwise: files of single-process caches unchanged)
        extra["tp"] = shard
    if cache.layer_configs:  # (absent otherwise: files of caches without per-layer configs unchanged)
        extra["layer_configs"] = {str(i): c.to_dict() for i, c in cache.layer_configs.items()}
    save_layers(path, slots, extra=extra)


def load_cache(model, path, device: str | torch.device | None = None) -> KVPackCache:
    """A :class:`KVPackCache` for ``model`` holding what :func:`save_cache` wrote to ``path``.

    Pass it to ``generate`` with the full token ids (prompt + new), as any filled cache; generation reads the
    saved tokens and appends the new ones.

    The file is verified and validated before any of it is used (see :mod:`kvpack.io`), and checked against
    ``model``: number and kind of layers, kv heads, head_dim and dtype of every layer, one batch size and one
    token count across layers, the method config of every quantized layer.

    Raises:
        CacheFileError: not a saved kvpack cache, damaged, forged, or saved for a model of another shape
            (layers, kv heads, head_dim), dtype or layer pattern. A ``ValueError`` subclass.
    """
    from ..io import MAX_HEAD_DIM, load_layers, read_extra

    config = getattr(model, "config", model)
    text_config = config.get_text_config(decoder=True)
    extra = read_extra(path)
    if extra.get("kind") != _CACHE_KIND:
        raise CacheFileError(f"{path} is a kvpack layer file but not a saved cache (use kvpack.io.load_layers)")
    if set(extra) - {"layer_configs", "tp"} != {"kind", "method_config", "skip_layers", "model"}:
        raise CacheFileError(f"{path}: the cache header has fields {sorted(extra)}")
    shape = _layer_shape(text_config)
    if extra["model"] != shape:
        raise CacheFileError(f"{path} was saved for a model with {extra['model']}, this one has {shape}")
    local_heads = _check_shard(path, extra.get("tp"), _model_shard(model), shape["num_kv_heads"])
    try:
        method_config = _config(extra["method_config"])
        layer_configs = _layer_configs(extra.get("layer_configs", {}))
        cache = KVPackCache(config, method_config, skip_layers=_skip_list(extra["skip_layers"]),
                            layer_configs=layer_configs)  # fmt: skip
    except (TypeError, ValueError, KeyError) as err:
        raise CacheFileError(f"{path}: invalid cache header ({err})") from None
    dtype = _model_dtype(model)
    if device is None:
        device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    saved = load_layers(path, device=device, max_head_dim=shape["head_dim"] or MAX_HEAD_DIM)
    if len(saved) != len(cache.layers):
        raise CacheFileError(f"{path} holds {len(saved)} layers, the model has {len(cache.layers)}")
    batch_tokens = set()
    for i, (layer, item) in enumerate(zip(cache.layers, saved)):
        where = f"{path}, layer {i}"
        if isinstance(layer, KVPackLayer):
            want = cache.config_of(i)
            if not isinstance(item, CompressedLayer) or item.config != want or item.layer_idx != i:
                raise CacheFileError(f"{where}: expected a {want.method} store of layer {i} with {want}, got {item!r}")
            if (item.sliding_window, item.drop_unit) != (layer.sliding_window, layer.store.drop_unit):
                raise CacheFileError(
                    f"{where}: saved with sliding_window={item.sliding_window}, drop_unit={item.drop_unit}; the "
                    f"model's layer has sliding_window={layer.sliding_window}, drop_unit={layer.store.drop_unit}"
                )
            batch, heads, dim = item.shape
            layer_dtype = item.dtype
            batch_tokens.add((batch, item.seq_length))
        elif type(layer) is DynamicLayer and i in cache.skip_layers:
            if not isinstance(item, tuple):
                raise CacheFileError(f"{where}: a skipped (fp) layer must be saved as fp keys/values")
            batch, heads, _, dim = item[0].shape
            layer_dtype = item[0].dtype
            batch_tokens.add((batch, item[0].shape[2]))
        else:
            raise CacheFileError(
                f"{where}: the model's layer is a {type(layer).__name__}, which saved caches do not hold"
            )
        if (heads, dim) != (local_heads, shape["head_dim"] or dim):
            raise CacheFileError(
                f"{where}: {heads} kv heads of head_dim {dim}, the model has {shape}"
                + (f" ({local_heads} kv heads per rank)" if local_heads != shape["num_kv_heads"] else "")
            )
        if dtype is not None and layer_dtype != dtype:
            raise CacheFileError(f"{where} holds {layer_dtype} tensors but the model runs in {dtype}; load it into a "
                                 f"{layer_dtype} model")  # fmt: skip
    if len(batch_tokens) > 1:
        raise CacheFileError(f"{path}: layers disagree on (batch, tokens): {sorted(batch_tokens)}")
    for layer, item in zip(cache.layers, saved):
        if isinstance(item, tuple):
            layer.update(*item)
        else:
            layer.adopt(item, device)
    return cache


def _saved_shard(slots, num_kv_heads: int) -> dict | None:
    """``{"size": N, "rank": r}`` when the layers hold 1/N of the model's kv heads (a tensor-parallel rank's
    cache), else None."""
    held = {(slot.shape[1] if isinstance(slot, CompressedLayer) else slot[0].shape[1]) for slot in slots}
    if held == {num_kv_heads}:
        return None
    if len(held) != 1 or num_kv_heads % next(iter(held)):
        raise ValueError(f"the layers hold {sorted(held)} kv heads; the model has {num_kv_heads}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"the layers hold {next(iter(held))} of the model's {num_kv_heads} kv heads, but no "
                         "torch.distributed process group is initialized (a tensor-parallel rank saves its own)")  # fmt: skip
    return {"size": num_kv_heads // next(iter(held)), "rank": torch.distributed.get_rank()}


def _model_shard(model) -> dict | None:
    """``{"size": N, "rank": r}`` for a model sharded by transformers' tensor parallelism, else None."""
    size = getattr(model, "tp_size", None)
    if not isinstance(size, int) or size <= 1:
        return None
    return {"size": size, "rank": torch.distributed.get_rank()}


def _check_shard(path, saved, model_shard, num_kv_heads: int) -> int:
    """The kv heads each layer of the file must hold, after checking that the file was saved by this process's
    place in the tensor-parallel layout (or by a single process, for a single process)."""
    if saved is not None and (not isinstance(saved, dict) or set(saved) != {"size", "rank"}
                              or not all(_is_count(v) for v in saved.values()) or saved["size"] < 2
                              or saved["rank"] >= saved["size"] or num_kv_heads % saved["size"]):  # fmt: skip
        raise CacheFileError(f"{path}: invalid tensor-parallel shard {saved!r} in the cache header")
    if saved == model_shard:
        return num_kv_heads if saved is None else num_kv_heads // saved["size"]
    if saved is None:
        raise CacheFileError(
            f"{path} was saved by a single process (all {num_kv_heads} kv heads); this model is tensor-parallel "
            f"(rank {model_shard['rank']} of {model_shard['size']}): load it in one process, or let each rank "
            "save and load its own file"
        )
    if model_shard is None:
        raise CacheFileError(f"{path} was saved by rank {saved['rank']} of a tensor-parallel model of size "
                             f"{saved['size']} (its kv heads only); load it on that rank")  # fmt: skip
    raise CacheFileError(f"{path} was saved by rank {saved['rank']} of {saved['size']}; this process is rank "
                         f"{model_shard['rank']} of {model_shard['size']}: each rank loads the file it saved")  # fmt: skip


def _config(data) -> MethodConfig:
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise ValueError(f"a method config must be an object with a 'method', got {data!r}")
    return config_class(data["method"]).from_dict(data)


def _layer_configs(value) -> dict[int, MethodConfig]:
    """The header's ``{"<layer>": config dict}`` -> {layer: config}."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() and str(int(k)) == k for k in value):
        raise ValueError(f"layer_configs must map layer indices to configs, got {value!r}")
    return {int(k): _config(v) for k, v in value.items()}


def _skip_list(value) -> list[int]:
    if not isinstance(value, list) or any(type(i) is not int for i in value) or len(set(value)) != len(value):
        raise ValueError(f"skip_layers must be a list of distinct layer indices, got {value!r}")
    return value


def _model_dtype(model) -> torch.dtype | None:
    """The dtype the model computes in (its first floating parameter), or its config's, or None."""
    if hasattr(model, "parameters"):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    dtype = getattr(getattr(model, "config", model), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None
