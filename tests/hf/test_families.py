"""The architecture matrix: tiny random models (no download) of the decoder families users run for long
context, each through stock ``generate`` with a kvpack cache on both attention paths.

Families and what each brings: Llama (the reference), Mistral (every layer a sliding window), Qwen2 (qkv
biases, sliding layers mixed with full ones), Qwen3 (q/k norms), Gemma 3 (head_dim 256, one kv head,
local/global layers, its own query scaling), Phi-3 (fused qkv projection), Granite (attention multiplier),
Falcon (the KIVI paper's third family; its attention bypasses ``AttentionInterface``, so compat only),
Mixtral and Qwen2-MoE (mixture-of-experts decoders). References are ``DynamicCache`` runs in the same process.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvpack  # noqa: E402
from kvpack.hf import disable, enable, load_cache, make_cache, runtime, save_cache  # noqa: E402
from kvpack.hf.cache import KVPackLayer  # noqa: E402

from conftest import generate_on_path  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=128, max_position_embeddings=512)  # fmt: skip
WINDOW = 24  # sliding window of the sliding families: 80 tokens leave it several times
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=256, num_attention_heads=2, num_key_value_heads=1, sliding_window=WINDOW, sliding_window_pattern=2,
        query_pre_attn_scalar=256)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=0.5)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        hidden_size=128, head_dim=None, num_kv_heads=2, new_decoder_architecture=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
}  # fmt: skip
#: Families whose attention does not go through AttentionInterface: kvpack's compat path only.
COMPAT_ONLY = {"falcon"}
METHODS = ("kivi", "qjl", "turbo")


@functools.cache
def _model(family: str):
    config_name, model_name, overrides = FAMILIES[family]
    fields = {k: v for k, v in {**BASE, **overrides}.items() if v is not None}
    config = getattr(transformers, config_name)(**fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    if family == "qwen2":  # qkv biases of real size (a fresh model's are zero)
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=2.0)
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
    return model


def _inputs(batch=2, tokens=60, pad=5, seed=0):
    """Random ids; row 1 left-padded over ``pad`` tokens."""
    ids = torch.randint(1, 128, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def _params(fused_too=True):
    out = []
    for family in FAMILIES:
        for fused in (False, True) if fused_too else (False,):
            marks = pytest.mark.skip(reason=f"{family} does not use AttentionInterface") if (
                fused and family in COMPAT_ONLY) else ()  # fmt: skip
            out.append(pytest.param(family, fused, id=f"{family}-{'fused' if fused else 'compat'}", marks=marks))
    return out


def _sliding_layers(model) -> list[int]:
    return [i for i, layer in enumerate(transformers.DynamicCache(config=model.config).layers) if layer.is_sliding]


@pytest.mark.parametrize("family, fused", _params())
@pytest.mark.parametrize("method", METHODS)
def test_generation_equals_dynamic_cache_when_the_residual_covers_everything(family, fused, method):
    """Batch 2, one row left padded, 60 prompt + 20 new tokens: with R = 256 nothing is quantized, so greedy
    tokens equal DynamicCache's, and every attention layer (sliding ones too) is a kvpack store."""
    model = _model(family)
    ids, mask = _inputs()
    reference = generate_on_path(model, transformers.DynamicCache(config=model.config), False, input_ids=ids,
                          attention_mask=mask, max_new_tokens=20)  # fmt: skip
    cache = make_cache(model, method, residual_length=256)
    out = generate_on_path(model, cache, fused, input_ids=ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(out, reference)
    assert all(isinstance(layer, KVPackLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 79
    for i in _sliding_layers(model):  # the sliding stores dropped what left the window, and say so to the mask
        layer = cache.layers[i]
        assert layer.is_sliding and WINDOW - 1 <= layer.store.num_tokens < 79 and layer.store.num_dropped > 0


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in COMPAT_ONLY])
@pytest.mark.parametrize("method", METHODS)
def test_fused_equals_compat_with_quantized_tokens(family, method, fused_and_compat_logits):
    """R = G = 32: 64 of a 70-token prompt are quantized at prefill, more at decode; the fused path reads
    the codes, the compat path their reconstruction, over identical cache states (sliding stores included)."""
    model = _model(family)
    ids, mask = _inputs(tokens=70)
    cache = make_cache(model, method, residual_length=32, group_size=32)
    compat, fused = fused_and_compat_logits(model, cache, ids, mask, steps=12)
    assert any(layer.store.keys.num_rows for layer in cache.layers)
    torch.testing.assert_close(fused, compat, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("family, fused", _params())
def test_beam_search_equals_dynamic_cache(family, fused):
    """Beam search reorders and repeats batch rows through the cache (sliding stores too)."""
    model = _model(family)
    ids, mask = _inputs(tokens=40)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3)
    reference = generate_on_path(model, transformers.DynamicCache(config=model.config), False, **kwargs)
    out = generate_on_path(model, make_cache(model, "kivi", residual_length=256), fused, **kwargs)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("family, fused", _params())
def test_a_saved_cache_continues_as_the_original(family, fused, tmp_path):
    """A quantized 70-token prompt cache (sliding stores past their window), saved and loaded, continues
    greedy generation exactly as a copy of the original does."""
    model = _model(family)
    ids, mask = _inputs(tokens=70)
    cache = make_cache(model, "kv3", residual_length=32, group_size=32)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{runtime.CACHE_KWARG: cache})
    save_cache(cache, tmp_path / "prompt.kvpack")
    loaded = load_cache(model, tmp_path / "prompt.kvpack")
    for i, layer in enumerate(loaded.layers):
        original = cache.layers[i].store
        assert (layer.store.seq_length, layer.store.num_tokens) == (original.seq_length, original.num_tokens)
    more = torch.randint(1, 128, (2, 1), generator=torch.Generator().manual_seed(3))
    full, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    kwargs = dict(input_ids=full, attention_mask=full_mask, max_new_tokens=10)
    want = generate_on_path(model, copy.deepcopy(cache), fused, **kwargs)
    assert torch.equal(generate_on_path(model, loaded, fused, **kwargs), want)


def test_falcon_refuses_the_fused_path_by_name():
    """Falcon's attention does not dispatch through AttentionInterface: enable says so (compat works above)."""
    model = _model("falcon")
    with pytest.raises(ValueError, match="FalconForCausalLM does not dispatch attention"):
        enable(model)
    disable(model)


def test_sliding_window_layers_are_compressed():
    """Mistral with a 64-token window after a 256-token prompt: the kvpack cache holds fewer bytes than
    transformers' own sliding cache (which keeps W - 1 fp tokens per layer), though it holds up to G - 1
    tokens more."""
    config_name, model_name, overrides = FAMILIES["mistral"]
    config = getattr(transformers, config_name)(**{**BASE, **overrides, "sliding_window": 64})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    ids = torch.randint(1, 128, (1, 256), generator=torch.Generator().manual_seed(0))
    fp = transformers.DynamicCache(config=config)
    cache = make_cache(model, kvpack.KIVIConfig(residual_length=32))
    with torch.no_grad():
        for c in (fp, cache):
            model(input_ids=ids, **{runtime.CACHE_KWARG: c})
            model(input_ids=ids[:, :1], **{runtime.CACHE_KWARG: c})  # a decode step: the drop happens here
    fp_bytes = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in fp.layers)
    assert all(layer.store.num_dropped for layer in cache.layers)
    assert cache.nbytes() < 0.5 * fp_bytes, (cache.nbytes(), fp_bytes)
