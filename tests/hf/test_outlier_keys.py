"""Outlier-prone keys, as in Qwen2/2.5: a few layers whose k_proj bias dwarfs the projected key (bias norms of
600 - 900 against a median key norm of ~22). The bias adds q.b to every score of a query, which softmax
ignores, so the model's fp outputs do not change; a quantizer that sees it must not either.

A tiny Qwen2 (q/k/v biases, Qwen2.5's RoPE base of 1e6) is run twice, with layer 1's k_proj bias at a
trained model's scale and at norm 700 per head, in the slowest-rotating RoPE channels (where a bias stays a
bias after RoPE: that is where Qwen2.5's sit); the kvpack cache's KL to the fp logits on the biased model
must stay within a stated factor of the KL on the ordinary one, with the presets' ``key_centering="on"`` and
with ``"auto"`` (which finds the biased layer alone).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvpack.hf import make_cache, runtime  # noqa: E402

CONFIG = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rope_parameters={"rope_type": "default",
              "rope_theta": 1e6})  # fmt: skip
#: The four slowest RoPE pairs of head_dim 64 (channel j pairs with j + 32; frequency falls with j).
SLOW_CHANNELS = [28, 29, 30, 31, 60, 61, 62, 63]
BIASED_LAYER = 1


def _models():
    """(ordinary, biased): the same random Qwen2, layer 1's k_proj bias replaced by one of norm 700 per kv head."""
    torch.manual_seed(0)
    ordinary = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)).eval()
    for layer in ordinary.model.layers:  # biases of a trained model's size (a fresh model's are zero)
        torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=1.0)
    biased = transformers.Qwen2ForCausalLM(ordinary.config).eval()
    biased.load_state_dict(ordinary.state_dict())
    bias = biased.model.layers[BIASED_LAYER].self_attn.k_proj.bias.data.view(2, 64)
    direction = torch.zeros(2, 64)
    direction[:, SLOW_CHANNELS] = torch.randn(2, len(SLOW_CHANNELS), generator=torch.Generator().manual_seed(1))
    bias.add_(direction / direction.norm(dim=-1, keepdim=True) * 700.0)
    return ordinary, biased


def _kl_to_fp(model, preset: str, **overrides) -> tuple[float, object]:
    """Mean KL(fp || kvpack) of the next-token distributions over 24 decode steps after a 200-token prompt
    (teacher forced with the fp model's greedy tokens), and the kvpack cache."""
    ids = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp = runtime.generate(model, None, input_ids=ids, max_new_tokens=24, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)  # fmt: skip
        cache = make_cache(model, preset, **overrides)
        logits = [model(input_ids=ids, **{runtime.CACHE_KWARG: cache}).logits[:, -1]]
        for token in fp.sequences[0, 200:-1]:
            logits.append(model(input_ids=token.view(1, 1), **{runtime.CACHE_KWARG: cache}).logits[:, -1])
    reference = torch.stack(fp.logits, 1).log_softmax(-1)
    ours = torch.stack(logits, 1).log_softmax(-1)
    return float((reference.exp() * (reference - ours)).sum(-1).mean()), cache


@pytest.mark.parametrize("preset", ["kv3", "kv4"])
def test_a_dominating_k_proj_bias_costs_a_preset_nothing(preset):
    ordinary, biased = _models()
    ids = torch.randint(1, 128, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the bias moves every score of a query by q.b: the fp model does not change
        torch.testing.assert_close(ordinary(input_ids=ids).logits, biased(input_ids=ids).logits, atol=1e-3, rtol=0)
    kl_ordinary, _ = _kl_to_fp(ordinary, preset)
    kl_biased, cache = _kl_to_fp(biased, preset)  # the presets center every head
    assert all(layer.store.key_offset is not None for layer in cache.layers)
    assert kl_biased <= 2.0 * kl_ordinary + 1e-4, (kl_biased, kl_ordinary)
    kl_auto, cache = _kl_to_fp(biased, preset, key_centering="auto")  # "auto" finds the biased layer alone
    centered = [i for i, layer in enumerate(cache.layers) if layer.store.key_offset is not None]
    assert centered == [BIASED_LAYER] and kl_auto <= 2.0 * kl_ordinary + 1e-4, (kl_auto, kl_ordinary)
    # Without centering, the rotated codebooks spend their bits on the bias (what the preset's setting buys).
    kl_plain, _ = _kl_to_fp(biased, preset, key_centering="off")
    assert kl_plain > 5 * kl_biased, (kl_plain, kl_biased)
