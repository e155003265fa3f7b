"""Decode-mode language-model quality: perplexity, KL to fp and top-1 agreement through a compressed cache.

A window of real text is split into a prefill of C tokens and N scored tokens. The prefill fills the cache;
then the N tokens are fed one at a time (teacher forcing) and each step's logits score the next token. So
every scored token's attention reads the quantized prompt and the quantized part of what was generated
before it, as in generation; nothing is fake-quantized. The fp reference runs the same loop with the
model's ``DynamicCache``, once, and is reused for every method (:class:`DecodeReference`).

Metrics over the W x N scored positions (natural log):

* ``ppl`` = exp(mean NLL of the true next token);
* ``kl`` = mean over positions of KL(p_fp || p_method) = sum_v p_fp(v) (log p_fp(v) - log p_method(v));
* ``top1`` = fraction of positions where the argmax of the method's logits equals the fp argmax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from typing import Any

import torch

from ._common import CacheFactory, cache_tensors, fill_cache, forward_last, fresh_cache, progress_bar

__all__ = ["DecodeReference", "PerplexityResult", "decode_reference", "perplexity", "window_offsets"]

logger = logging.getLogger(__name__)


def _fingerprint(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def window_offsets(num_tokens: int, window: int, windows: int) -> list[int]:
    """Start offsets of ``windows`` windows of ``window`` tokens spread evenly over ``num_tokens`` tokens.

    The first window starts at 0 and the last ends at the end of the text.

    Raises:
        ValueError: the text is shorter than one window, or ``windows`` < 1.
    """
    if windows < 1:
        raise ValueError(f"windows must be a positive integer, got {windows!r}")
    if num_tokens < window:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one window of {window}")
    room = num_tokens - window
    if windows == 1:
        return [0]
    return [round(i * room / (windows - 1)) for i in range(windows)]


@dataclasses.dataclass
class DecodeReference:
    """The fp run every method is compared with: the windows, their prefill keys/values, fp log-probs.

    Attributes:
        prefill, tokens: C and N.
        offsets: start token of each window in the tokenized text.
        input_ids: (W, C + N + 1) int64, the windows.
        batch_size: windows run together.
        prefill_kv: per batch, per layer ``(keys, values)`` (b, H_kv, C, D) after the fp prefill; None when
            the prefill cannot be shared (each method then runs its own).
        fp_cache_type: the type of the model's own cache (used to build fresh fp caches).
        log_probs: (W, N, V) float32 fp log-probabilities at the scored positions.
        nll: (W, N) float32 fp negative log-likelihood of the true next tokens.
        text_fingerprint: identifies the text the windows were cut from.
        seconds: wall time of the fp run.
    """

    prefill: int
    tokens: int
    offsets: tuple[int, ...]
    input_ids: torch.Tensor
    batch_size: int
    prefill_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] | None
    fp_cache_type: type
    log_probs: torch.Tensor
    nll: torch.Tensor
    text_fingerprint: str
    seconds: float

    @property
    def windows(self) -> int:
        return self.input_ids.shape[0]

    def batches(self) -> list[slice]:
        return [slice(i, min(i + self.batch_size, self.windows)) for i in range(0, self.windows, self.batch_size)]

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.double().mean().item())

    def as_result(self, label: str = "fp") -> PerplexityResult:
        """The fp numbers as a :class:`PerplexityResult` (KL 0, agreement 1 by definition)."""
        return PerplexityResult(
            label=label,
            prefill=self.prefill,
            tokens=self.tokens,
            windows=self.windows,
            ppl=self.ppl,
            kl=0.0,
            top1=1.0,
            fp_ppl=self.ppl,
            per_window_ppl=[math.exp(row.double().mean().item()) for row in self.nll],
            per_window_kl=[0.0] * self.windows,
            seconds=self.seconds,
            reference=self,
        )


@dataclasses.dataclass
class PerplexityResult:
    """Decode-mode quality of one method against the fp reference (see the module docstring)."""

    label: str
    prefill: int
    tokens: int
    windows: int
    ppl: float
    kl: float
    top1: float
    fp_ppl: float
    per_window_ppl: list[float]
    per_window_kl: list[float]
    seconds: float
    reference: DecodeReference | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, reference=None))
        out.pop("reference")
        return out


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def decode_reference(
    model,
    tokenizer,
    text: str,
    *,
    prefill: int = 2048,
    tokens: int = 128,
    windows: int = 1,
    batch_size: int | None = None,
    share_prefill: bool = True,
    progress: bool = False,
) -> DecodeReference:
    """Run the fp model (its own ``DynamicCache``) over ``windows`` windows of ``text``, once.

    Args:
        model: a transformers causal LM in eval mode.
        tokenizer: its tokenizer (``tokenizer(text, add_special_tokens=False)["input_ids"]``).
        text: the corpus, e.g. ``kvpack.data.austen_text("prideprejudice")``.
        prefill, tokens: C prompt tokens, then N tokens scored one at a time.
        windows: W windows spread evenly over the text; the first starts at token 0.
        batch_size: windows decoded together (default: all); the same for every method.
        share_prefill: keep the prefill keys/values so that methods reuse them (see :mod:`._common`).
        progress: show a tqdm bar on stderr.

    Raises:
        ValueError: non-positive sizes, or a text shorter than one window.
    """
    for name, value in (("prefill", prefill), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    start = time.perf_counter()
    all_ids = _tokenize(tokenizer, text)
    window = prefill + tokens + 1
    offsets = window_offsets(all_ids.numel(), window, windows)
    input_ids = torch.stack([all_ids[o : o + window] for o in offsets])  # (W, C + N + 1)
    batch_size = windows if batch_size is None else max(1, min(batch_size, windows))
    log_probs = nll = None
    prefill_kv: list | None = [] if share_prefill else None
    fp_cache_type = None
    batches = [slice(i, min(i + batch_size, windows)) for i in range(0, windows, batch_size)]
    with progress_bar(len(batches) * tokens, "fp reference", progress) as bar:
        for rows in batches:
            ids = input_ids[rows]
            cache, _ = forward_last(model, ids[:, :prefill])
            fp_cache_type = type(cache)
            kv = cache_tensors(cache, prefill)
            if prefill_kv is not None and kv is None:
                logger.info("the model's cache has layers of another kind; each method runs its own prefill")
                prefill_kv = None
            if kv is not None:
                # Decode on a fresh copy exactly as every method does, so an fp rerun is bit-identical.
                cache = fresh_cache(model, None, fp_cache_type)
                fill_cache(cache, kv)
                if prefill_kv is not None:
                    prefill_kv.append(kv)
            for step in range(tokens):
                _, logits = forward_last(model, ids[:, prefill + step : prefill + step + 1], cache)
                step_log_probs = torch.log_softmax(logits, dim=-1)  # (b, V)
                if log_probs is None:
                    log_probs = torch.empty(windows, tokens, step_log_probs.shape[-1])  # (W, N, V)
                    nll = torch.empty(windows, tokens)
                log_probs[rows, step] = step_log_probs
                target = ids[:, prefill + step + 1]  # (b,)
                nll[rows, step] = -step_log_probs.gather(-1, target[:, None]).squeeze(-1)
                bar.update()
    return DecodeReference(
        prefill=prefill,
        tokens=tokens,
        offsets=tuple(offsets),
        input_ids=input_ids,
        batch_size=batch_size,
        prefill_kv=prefill_kv,
        fp_cache_type=fp_cache_type,
        log_probs=log_probs,
        nll=nll,
        text_fingerprint=_fingerprint(text),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    cache_factory: CacheFactory | None = None,
    *,
    prefill: int = 2048,
    tokens: int = 128,
    windows: int = 1,
    batch_size: int | None = None,
    reference: DecodeReference | None = None,
    share_prefill: bool = True,
    label: str | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Decode-mode perplexity, KL to fp and top-1 agreement of one cache (see the module docstring).

    Args:
        model, tokenizer, text: as in :func:`decode_reference`.
        cache_factory: ``factory(model)`` -> a fresh cache (e.g. ``lambda m: kvpack.make_cache(m, cfg)``);
            None, or a factory returning None, means the fp ``DynamicCache``.
        prefill, tokens, windows, batch_size: as in :func:`decode_reference`; ignored when ``reference``
            is given (its own are used).
        reference: the fp run to compare with; computed (and attached to the result as ``.reference``) when
            None. Pass it on to evaluate more methods without recomputing it.
        share_prefill: start from the reference's prefill keys/values instead of running the prefill again
            through this cache (equivalent, see :mod:`kvpack.eval._common`).
        label: name of the method in the result.
        progress: show a tqdm bar on stderr.

    Returns:
        A :class:`PerplexityResult`. With ``cache_factory=None`` and no ``reference`` the fp numbers are
        returned directly (KL 0, agreement 1) without a second run.

    Raises:
        ValueError: ``reference`` was computed on another text.
    """
    if reference is None:
        reference = decode_reference(
            model,
            tokenizer,
            text,
            prefill=prefill,
            tokens=tokens,
            windows=windows,
            batch_size=batch_size,
            share_prefill=share_prefill,
            progress=progress,
        )
        if cache_factory is None:
            return reference.as_result(label or "fp")
    elif reference.text_fingerprint != _fingerprint(text):
        raise ValueError("reference was computed on another text; pass the same text or reference=None")
    label = label or "method"
    prefill, tokens = reference.prefill, reference.tokens
    start = time.perf_counter()
    nll = torch.empty(reference.windows, tokens)
    kl = torch.empty(reference.windows, tokens)
    agree = torch.empty(reference.windows, tokens, dtype=torch.bool)
    with progress_bar(len(reference.batches()) * tokens, label, progress) as bar:
        for batch_idx, rows in enumerate(reference.batches()):
            ids = reference.input_ids[rows]
            if share_prefill and reference.prefill_kv is not None:
                cache = fresh_cache(model, cache_factory, reference.fp_cache_type)
                fill_cache(cache, reference.prefill_kv[batch_idx])
            else:
                cache = cache_factory(model) if cache_factory is not None else None
                cache, _ = forward_last(model, ids[:, :prefill], cache)
            for step in range(tokens):
                _, logits = forward_last(model, ids[:, prefill + step : prefill + step + 1], cache)
                log_probs = torch.log_softmax(logits, dim=-1)  # (b, V)
                ref_log_probs = reference.log_probs[rows, step]  # (b, V)
                target = ids[:, prefill + step + 1]
                nll[rows, step] = -log_probs.gather(-1, target[:, None]).squeeze(-1)
                kl[rows, step] = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
                agree[rows, step] = log_probs.argmax(-1) == ref_log_probs.argmax(-1)
                bar.update()
    return PerplexityResult(
        label=label,
        prefill=prefill,
        tokens=tokens,
        windows=reference.windows,
        ppl=math.exp(nll.double().mean().item()),
        kl=kl.double().mean().item(),
        top1=agree.double().mean().item(),
        fp_ppl=reference.ppl,
        per_window_ppl=[math.exp(row.double().mean().item()) for row in nll],
        per_window_kl=[row.double().mean().item() for row in kl],
        seconds=time.perf_counter() - start,
        reference=reference,
    )
