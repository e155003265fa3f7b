"""Evaluation of KV-cache methods on a real model: quality, retrieval, attention distortion, memory.

* :func:`perplexity`: decode-mode perplexity, KL to fp and top-1 agreement through a compressed cache
  (:func:`decode_reference` computes the fp run once, to share across methods);
* :func:`kl_divergence`: llama.cpp's ``--kl-divergence`` protocol (chunks fed in micro-batches, KL over
  each chunk's second half), for numbers next to llama.cpp's cache types;
* :func:`retrieval` over :func:`make_samples` (passkey, RULER niah_single_1 / niah_multikey_2);
* :func:`capture_attention` + :func:`attention_distortion`: per-layer attention-weight error;
* :func:`memory_footprint`: bytes held, compression and effective bits per element;
* :func:`run_matrix` runs an :class:`EvalConfig` over a method matrix and :func:`write_report` writes it out
  (the ``kvpack eval`` command does both).

Model-level functions take a transformers model and tokenizer (``kvpack.load_model()``) and a cache factory:
``factory(model)`` -> a fresh cache, e.g. ``lambda m: kvpack.make_cache(m, kvpack.KIVIConfig())``, or None
for the model's own fp ``DynamicCache``. Nothing here imports transformers; see docs/EVAL.md.
"""

from .distortion import AttentionCapture, DistortionResult, attention_distortion, capture_attention
from .kld import KLDResult, kl_divergence
from .matrix import (
    FULL,
    QUICK,
    SUITES,
    DistortionSettings,
    EvalConfig,
    EvalRun,
    KLDSettings,
    MemorySettings,
    MethodSpec,
    PerplexitySettings,
    RetrievalSettings,
    default_methods,
    run_matrix,
)
from .memory import MemoryRow, kv_shape, memory_footprint
from .perplexity import DecodeReference, PerplexityResult, decode_reference, perplexity
from .report import environment, markdown, summary_rows, write_report
from .retrieval import (
    RETRIEVAL_TASKS,
    RetrievalOutcome,
    RetrievalSample,
    make_sample,
    make_samples,
    niah_sample,
    parse_answer,
    passkey_sample,
    retrieval,
    summarize,
)

__all__ = [
    "FULL",
    "QUICK",
    "RETRIEVAL_TASKS",
    "SUITES",
    "AttentionCapture",
    "DecodeReference",
    "DistortionResult",
    "DistortionSettings",
    "EvalConfig",
    "EvalRun",
    "KLDResult",
    "KLDSettings",
    "MemoryRow",
    "MemorySettings",
    "MethodSpec",
    "PerplexityResult",
    "PerplexitySettings",
    "RetrievalOutcome",
    "RetrievalSample",
    "RetrievalSettings",
    "attention_distortion",
    "capture_attention",
    "decode_reference",
    "default_methods",
    "environment",
    "kl_divergence",
    "kv_shape",
    "make_sample",
    "make_samples",
    "markdown",
    "memory_footprint",
    "niah_sample",
    "parse_answer",
    "passkey_sample",
    "perplexity",
    "retrieval",
    "run_matrix",
    "summarize",
    "summary_rows",
    "write_report",
]
