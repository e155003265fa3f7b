"""kvpack: quantized KV caches for LLM inference.

Importing kvpack imports neither transformers nor any compiler; :mod:`kvpack.hf` holds the transformers
integration and is loaded on first use of its functions.
"""

from . import presets
from .config import MethodConfig
from .errors import CacheFileError
from .methods import CompressedLayer, KIVIConfig, KIVILayer, QJLConfig, QJLLayer, TurboConfig, TurboLayer
from .registry import config_class, make_layer, method_names, variants

__version__ = "0.1.0"

__all__ = [
    "CacheFileError",
    "CompressedLayer",
    "KIVIConfig",
    "KIVILayer",
    "QJLConfig",
    "QJLLayer",
    "TurboConfig",
    "TurboLayer",
    "MethodConfig",
    "config_class",
    "make_layer",
    "method_names",
    "presets",
    "variants",
    "__version__",
    "disable",
    "enable",
    "load_cache",
    "load_model",
    "make_cache",
    "save_cache",
]

_HF_EXPORTS = ("disable", "enable", "load_cache", "load_model", "make_cache", "save_cache")


def __getattr__(name: str):
    # The transformers integration is imported on first use, never by ``import kvpack``.
    if name in _HF_EXPORTS:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'kvpack' has no attribute {name!r}")
