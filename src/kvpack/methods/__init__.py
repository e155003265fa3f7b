"""One module per method: a frozen config and a per-layer store, registered with :mod:`kvpack.registry`."""

from .base import CompressedLayer
from .kivi import KIVIConfig, KIVILayer
from .qjl import QJLConfig, QJLLayer
from .turbo import TurboConfig, TurboLayer

__all__ = ["CompressedLayer", "KIVIConfig", "KIVILayer", "QJLConfig", "QJLLayer", "TurboConfig", "TurboLayer"]
