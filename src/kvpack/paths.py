"""kvpack's cache folder: the converted default model, the Austen corpus and built kernels live under it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

#: Environment variable that moves the cache folder (default ``~/.cache/kvpack``).
CACHE_ENV = "KVPACK_CACHE"


def cache_root() -> Path:
    """``$KVPACK_CACHE`` if set, else ``~/.cache/kvpack`` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpack").expanduser()
