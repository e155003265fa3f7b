"""Method registry: config type -> per-layer implementation, and each method's named settings.

This is the only list of methods: ``kvpack eval``'s default matrix, ``kvpack bench``'s rows, ``kvpack demo``
and the saved-cache tests all read :func:`variants`, so a new method appears everywhere once registered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .config import MethodConfig

__all__ = ["config_class", "make_layer", "method_names", "register", "variants"]

_LAYERS: dict[type, Callable] = {}
_CONFIGS: dict[str, type] = {}
_VARIANTS: dict[str, MethodConfig] = {}
#: Fields every method config has: the store's flush rules and input check read them.
REQUIRED_FIELDS = ("group_size", "residual_length", "check_finite")


def register(config_cls: type, variants: dict[str, dict] | None = None) -> Callable:
    """Class decorator: ``@register(KIVIConfig, {"KIVI-2": {}})`` makes ``make_layer`` build the class.

    Args:
        config_cls: the method's config class (a :class:`MethodConfig` dataclass with :data:`REQUIRED_FIELDS`).
        variants: label -> config overrides: the method's named settings, in the order they are shown
            (default: one variant, the method's name, at the config's defaults).

    Raises:
        TypeError: the config class lacks a required field, or a label is taken.
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise TypeError(f"{config_cls.__name__} must declare the fields {missing} (every method config has them)")

    def wrap(layer_cls: Callable) -> Callable:
        _LAYERS[config_cls] = layer_cls
        _CONFIGS[config_cls.method] = config_cls
        for label, overrides in (variants or {config_cls.method: {}}).items():
            if label in _VARIANTS:
                raise TypeError(f"variant label {label!r} is registered twice")
            _VARIANTS[label] = config_cls(**overrides)
        return layer_cls

    return wrap


def make_layer(config: MethodConfig, layer_idx: int = 0, *, sliding_window: int | None = None,
               drop_unit: int | None = None):  # fmt: skip
    """Build one attention layer's compressed KV store for ``config``.

    ``sliding_window`` W makes it a sliding-window layer (the query at position p reads positions
    p - W + 1 .. p; older tokens are dropped in whole units of ``drop_unit`` tokens, default the config's
    row sizes; see :class:`kvpack.store.CompressedLayer`).

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
    return layer_cls(config, layer_idx=layer_idx, sliding_window=sliding_window, drop_unit=drop_unit)


def method_names() -> list[str]:
    """Names of the registered methods, e.g. ``["kivi", "qjl", "turbo"]``."""
    return list(_CONFIGS)


def variants() -> dict[str, MethodConfig]:
    """Every method's named settings, label -> config, methods in registration order (e.g. ``"KIVI-2"``)."""
    return dict(_VARIANTS)


def config_class(name: str) -> type:
    """The config class registered under ``name``; ``ValueError`` lists the known names."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ValueError(f"method must be one of {tuple(_CONFIGS)}, got {name!r}") from None
