"""One folder per method: config, formats and layer (``__init__``), reference math, kernel ops, CPU kernels.

Importing this package registers every method with :mod:`kvpack.registry` (the only list of methods).
"""

from ..store import CompressedLayer
from .kivi import KIVIConfig, KIVILayer
from .qjl import QJLConfig, QJLLayer
from .turbo import TurboConfig, TurboLayer

__all__ = ["CompressedLayer", "KIVIConfig", "KIVILayer", "QJLConfig", "QJLLayer", "TurboConfig", "TurboLayer"]
