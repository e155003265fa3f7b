"""kvpack.hf.runtime: the single place that spells transformers' forward/generate/cache calls."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")

import kvpack  # noqa: E402
from kvpack.hf import runtime  # noqa: E402


def test_forward_matches_a_cacheless_pass_and_fills_the_cache(tiny_llama):
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny_llama(input_ids=ids, use_cache=False).logits
        cache, logits = runtime.forward(tiny_llama, ids, runtime.dynamic_cache(tiny_llama))
    torch.testing.assert_close(logits, reference)
    assert cache.get_seq_length() == 12

    with torch.no_grad():
        cache, last = runtime.forward(tiny_llama, ids[:, :4], None, logits_to_keep=1)
        cache, step = runtime.forward(tiny_llama, ids[:, 4:5], cache, logits_to_keep=1)
    assert last.shape == (2, 1, 128) and cache.get_seq_length() == 5
    torch.testing.assert_close(step[:, -1], reference[:, 4], atol=1e-5, rtol=1e-5)


def test_generate_passes_the_cache(tiny_llama):
    ids = torch.randint(2, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    cache = kvpack.make_cache(tiny_llama, kvpack.KIVIConfig(group_size=4, residual_length=8))
    out = runtime.generate(tiny_llama, cache, input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
    assert cache.get_seq_length() == 12  # the last generated token is never fed back


def test_cache_nbytes_counts_what_each_cache_holds(tiny_llama):
    ids = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    fp = runtime.dynamic_cache(tiny_llama)
    with torch.no_grad():
        runtime.forward(tiny_llama, ids, fp)
    by_hand = sum(t.numel() * t.element_size() for layer in fp.layers for t in (layer.keys, layer.values))
    assert runtime.cache_nbytes(fp) == by_hand == 2 * 2 * 2 * 40 * 16 * 4  # layers, K/V, heads, tokens, dim, fp32

    packed = kvpack.make_cache(tiny_llama, kvpack.KIVIConfig(group_size=8, residual_length=8))
    with torch.no_grad():
        runtime.forward(tiny_llama, ids, packed)
    assert runtime.cache_nbytes(packed) == packed.nbytes() < by_hand


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="needs optimum-quanto")
def test_quantized_baseline_layer_attends_near_the_fp_answer():
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 200, 64, generator=gen), torch.randn(1, 2, 200, 64, generator=gen)
    query = torch.randn(1, 4, 1, 64, generator=gen)
    layer = runtime.quantized_layer("quanto", keys, values, nbits=4, group_size=64, residual_length=128)
    assert layer._quantized_keys is not None  # the prompt went to the quantized store
    out = runtime.quantized_layer_attention(layer, query)
    exact = torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
    error = (out - exact).norm() / exact.norm()
    assert error < 0.2, error  # 4-bit: close, but not exact
    assert error > 0  # the quantized store was really read


def test_unknown_backend_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="backend must be one of"):
        runtime.quantized_cache(tiny_llama, "int3")
    with pytest.raises(ValueError, match="backend must be one of"):
        runtime.quantized_layer("int3", torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
