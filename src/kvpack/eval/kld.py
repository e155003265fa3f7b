"""The protocol llama.cpp users judge caches by (``llama-perplexity --kl-divergence``), so kvpack's numbers
sit next to theirs.

The text is cut into consecutive chunks of ``chunk`` tokens (2048); each chunk is fed from an empty cache in
micro-batches of ``ubatch`` tokens (512), as llama.cpp's batched prompt processing does, and the logits of
the second half of the chunk are compared with the uncompressed cache's: mean KL(fp || method) per scored
position, top-1 agreement, and the method's perplexity. Unlike :mod:`kvpack.eval.perplexity` (one token at a
time after a prefill), every scored position here attends with a multi-token query over a cache being
filled, the setting of prompt processing.

What differs from llama.cpp's caches (and explains some of kvpack's lead): kvpack keeps the last R tokens of
every layer in full precision (the residual / window), KIVI groups keys per channel, and the query is never
quantized; llama.cpp quantizes every token of the cache in blocks of 32 along the channels.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from ._common import CacheFactory, progress_bar, returned_cache

__all__ = ["KLDResult", "kl_divergence"]


@dataclasses.dataclass
class KLDResult:
    """One method under the llama.cpp protocol (see the module docstring)."""

    label: str
    chunks: int
    chunk: int
    ubatch: int
    kl: float
    top1: float
    ppl: float
    fp_ppl: float
    per_chunk_kl: list[float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _chunk_log_probs(model, ids: torch.Tensor, cache, ubatch: int, first: int) -> torch.Tensor:
    """Feed ``ids`` (1, C) in micro-batches through ``cache``; log-probs of positions ``first .. C-2``
    (predicting tokens ``first+1 .. C-1``), (C - 1 - first, V) float32."""
    out = []
    for start in range(0, ids.shape[1], ubatch):
        piece = ids[:, start : start + ubatch]
        result = model(input_ids=piece, cache=cache, use_cache=True)
        cache = returned_cache(result)
        lo, hi = max(first, start), min(start + piece.shape[1], ids.shape[1] - 1)
        if lo < hi:
            out.append(torch.log_softmax(result.logits[0, lo - start : hi - start].float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def kl_divergence(
    model,
    tokenizer,
    text: str,
    methods: dict[str, CacheFactory],
    *,
    chunk: int = 2048,
    ubatch: int = 512,
    chunks: int = 8,
    progress: bool = False,
) -> dict[str, KLDResult]:
    """Every method of ``methods`` (label -> ``factory(model)`` of a fresh cache) under the protocol.

    The fp reference runs chunk by chunk with the model's own cache, interleaved with the methods, so only
    one chunk's fp log-probabilities are held at a time.

    Raises:
        ValueError: non-positive sizes, ``ubatch`` larger than ``chunk``, or a text shorter than ``chunks``
            chunks.
    """
    for name, value in (("chunk", chunk), ("ubatch", ubatch), ("chunks", chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if ubatch > chunk or chunk < 4:
        raise ValueError(f"ubatch ({ubatch}) must be at most chunk ({chunk}), and chunk at least 4")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < chunks * chunk:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than {chunks} chunks of {chunk}")
    first = chunk // 2
    totals = {label: {"kl": [], "agree": 0, "nll": 0.0, "seconds": 0.0} for label in methods}
    fp_nll, scored = 0.0, 0
    with progress_bar(chunks * (len(methods) + 1), "kl-divergence", progress) as bar:
        for c in range(chunks):
            piece = ids[c * chunk : (c + 1) * chunk].unsqueeze(0)  # (1, C)
            targets = piece[0, first + 1 :]
            reference = _chunk_log_probs(model, piece, None, ubatch, first)  # (C - 1 - first, V)
            fp_nll += -reference.gather(-1, targets[:, None]).sum().item()
            scored += targets.numel()
            bar.update()
            ref_probs, ref_top = reference.exp(), reference.argmax(-1)
            for label, factory in methods.items():
                start = time.perf_counter()
                log_probs = _chunk_log_probs(model, piece, factory(model), ubatch, first)
                entry = totals[label]
                entry["kl"].append((ref_probs * (reference - log_probs)).sum(-1).double().mean().item())
                entry["agree"] += int((log_probs.argmax(-1) == ref_top).sum())
                entry["nll"] += -log_probs.gather(-1, targets[:, None]).sum().item()
                entry["seconds"] += time.perf_counter() - start
                bar.update()
    return {
        label: KLDResult(
            label=label,
            chunks=chunks,
            chunk=chunk,
            ubatch=ubatch,
            kl=sum(entry["kl"]) / chunks,
            top1=entry["agree"] / scored,
            ppl=math.exp(entry["nll"] / scored),
            fp_ppl=math.exp(fp_nll / scored),
            per_chunk_kl=entry["kl"],
            seconds=entry["seconds"],
        )
        for label, entry in totals.items()
    }
