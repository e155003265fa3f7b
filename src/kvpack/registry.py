"""Method registry: config type -> per-layer implementation."""

from __future__ import annotations

from typing import Callable

from .config import MethodConfig

__all__ = ["register", "make_layer", "method_names", "config_class"]

_LAYERS: dict[type, Callable] = {}
_CONFIGS: dict[str, type] = {}


def register(config_cls: type) -> Callable:
    """Class decorator: ``@register(KIVIConfig) class KIVILayer`` makes ``make_layer`` build it."""

    def wrap(layer_cls: Callable) -> Callable:
        _LAYERS[config_cls] = layer_cls
        _CONFIGS[config_cls.method] = config_cls
        return layer_cls

    return wrap


def make_layer(config: MethodConfig, layer_idx: int = 0):
    """Build one attention layer's compressed KV store for ``config``.

    Raises:
        TypeError: ``config`` is not a registered method config.
        ValueError: ``layer_idx`` is not an integer in [0, 2**31).
    """
    if type(layer_idx) is not int or not 0 <= layer_idx < 2**31:
        raise ValueError(f"layer_idx must be an integer in [0, 2**31), got {layer_idx!r}")
    try:
        layer_cls = _LAYERS[type(config)]
    except KeyError:
        raise TypeError(
            f"make_layer expects one of {[c.__name__ for c in _LAYERS]}, got {type(config).__name__}"
        ) from None
    return layer_cls(config, layer_idx=layer_idx)


def method_names() -> list[str]:
    """Names of the registered methods, e.g. ``["kivi", "qjl"]``."""
    return list(_CONFIGS)


def config_class(name: str) -> type:
    """The config class registered under ``name``; ``ValueError`` lists the known names."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ValueError(f"method must be one of {tuple(_CONFIGS)}, got {name!r}") from None
