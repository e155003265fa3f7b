"""The transformers integration: the only part of kvpack that imports transformers.

* :func:`make_cache` / :class:`KVPackCache`: a ``transformers.Cache`` of kvpack layers for ``generate``
  or a forward loop (``cache=`` in transformers 5.24; ``past_key_values=`` is its deprecated spelling).
* :func:`enable` / :func:`disable`: per model, switch attention to the fused ``"kvpack"`` function that
  reads the packed store instead of dequantized K/V (compat path otherwise; both agree within fp error).
* :func:`save_cache` / :func:`load_cache`: a filled cache to disk and back, continuing exactly (prompt caching).
* :func:`load_model`: offline model loading, the embedded SmolLM2-135M-Instruct by default.

See docs/INTEGRATION.md.
"""

from .attention import ATTENTION_NAME, disable, enable, is_enabled, kvpack_attention_forward
from .cache import KVHandle, KVPackCache, KVPackLayer, load_cache, make_cache, save_cache
from .loading import load_model

__all__ = [
    "ATTENTION_NAME",
    "KVHandle",
    "KVPackCache",
    "KVPackLayer",
    "disable",
    "enable",
    "is_enabled",
    "kvpack_attention_forward",
    "load_cache",
    "load_model",
    "make_cache",
    "save_cache",
]
