"""One module per method: a frozen config and a per-layer store, registered with :mod:`kvpack.registry`."""

from .base import CompressedLayer
from .kivi import KIVIConfig, KIVILayer

__all__ = ["CompressedLayer", "KIVIConfig", "KIVILayer"]
