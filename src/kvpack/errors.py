"""Exceptions that kvpack raises on purpose (beyond the ValueError/TypeError of bad arguments)."""

from __future__ import annotations

__all__ = ["CacheFileError"]


class CacheFileError(ValueError):
    """A saved cache (file or layer state) is damaged, forged, or does not fit what it is loaded into.

    Raised before any of its tensors is used: by :func:`kvpack.load_cache`, :func:`kvpack.io.load_layers`
    and :meth:`kvpack.CompressedLayer.load_state_dict`. The message names the file, the layer and the tensor
    or field, and what was expected.
    """
