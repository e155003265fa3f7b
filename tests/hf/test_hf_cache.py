"""kvpack.hf on a tiny random Llama (and Qwen2 for sliding-window layers): the whole matrix, in seconds.

Every registered method x {compat, fused} path x the cache operations generate uses: batch with left
padding, beam search (reorder), crop (prompt-lookup decoding), select / repeat, continue-from-cache,
skip_layers, reset. References are DynamicCache runs of the same model in the same process.
"""

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, DynamicLayer  # noqa: E402
from transformers.cache_utils import DynamicSlidingWindowLayer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import kvpack  # noqa: E402
from kvpack.hf import KVHandle, KVPackCache, KVPackLayer, disable, enable, is_enabled, make_cache  # noqa: E402
from kvpack.hf.attention import kvpack_attention_forward  # noqa: E402

from conftest import TINY_LLAMA, make_tiny_llama  # noqa: E402

# Sized for the tiny model (head_dim 16): groups of 8 tokens, fp residual of 16, so a 20-token prompt is
# already partly quantized.
SMALL = dict(group_size=8, residual_length=16)


def method_cases():
    """(id, config) for every registered method, easy to hard, sized for head_dim 16."""
    cases = [("kivi4", kvpack.KIVIConfig(key_bits=4, value_bits=4, **SMALL)), ("kivi2", kvpack.KIVIConfig(**SMALL))]
    for name in kvpack.method_names():
        if name != "kivi":
            cases.append((name, kvpack.config_class(name)().replace(**SMALL)))
    cases.append(("turbo-sinks", kvpack.TurboConfig(key_bits=4, sink_tokens=3, **SMALL)))  # fp sinks: every path
    return cases


METHODS = [pytest.param(config, id=name) for name, config in method_cases()]
PATHS = [pytest.param(False, id="compat"), pytest.param(True, id="fused")]


def set_path(model, fused):
    (enable if fused else disable)(model)
    return model


def left_padded_batch(lengths=(20, 13), seed=0, vocab=TINY_LLAMA["vocab_size"]):
    """(input_ids, attention_mask), (B, max(lengths)), left padded with pad id 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(2, vocab, (len(lengths), width), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, : width - length] = 0
        attention_mask[row, : width - length] = 0
    return input_ids, attention_mask


def generate(model, cache, input_ids, attention_mask, **kwargs):
    kwargs = {"max_new_tokens": 12, "do_sample": False, **kwargs}
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)


# --- construction -------------------------------------------------------------------------------------


def test_import_kvpack_does_not_import_transformers():
    code = "import sys, kvpack; kvpack.KIVIConfig(); assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_make_cache_builds_one_kvpack_layer_per_attention_layer(tiny_llama):
    cache = make_cache(tiny_llama, kvpack.KIVIConfig(**SMALL), key_bits=4)
    assert isinstance(cache, transformers.Cache) and isinstance(cache, KVPackCache)
    assert [type(layer) for layer in cache.layers] == [KVPackLayer, KVPackLayer]
    assert cache.method_config == kvpack.KIVIConfig(key_bits=4, **SMALL)
    assert [layer.store.layer_idx for layer in cache.layers] == [0, 1]
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0 and cache.fp16_nbytes() == 0
    assert not cache.is_compileable and cache.is_croppable

    skipped = make_cache(tiny_llama, "kivi", skip_layers=(0,), **SMALL)
    assert [type(layer) for layer in skipped.layers] == [DynamicLayer, KVPackLayer]
    assert skipped.method_config == kvpack.KIVIConfig(**SMALL)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("kivi",), {"bogus": 1}, ValueError, "unknown KIVIConfig fields"),
        (("kivi",), {"key_bits": 3}, ValueError, "key_bits must be one of"),
        (("nope",), {}, ValueError, "method must be one of"),
        ((kvpack.KIVIConfig(**SMALL),), {"skip_layers": (2,)}, ValueError, r"skip_layers must be layer indices in \[0"),
        ((kvpack.KIVIConfig(),), {}, ValueError, "group_size 32 must divide the model's head_dim 16"),
        (({"key_bits": 4},), {}, TypeError, "MethodConfig"),
    ],
)
def test_make_cache_rejects_bad_arguments(tiny_llama, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_cache(tiny_llama, *args, **kwargs)


# --- attention function ---------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def _filled_store(tokens=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    store = kvpack.make_layer(kvpack.KIVIConfig(key_bits=4, value_bits=4, **SMALL))
    store.append(torch.randn(2, 2, tokens, 16, generator=generator), torch.randn(2, 2, tokens, 16, generator=generator))
    return store


@pytest.mark.parametrize("t_q", [1, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_function_matches_sdpa_on_the_materialized_store(t_q, masked):
    store = _filled_store()
    query = torch.randn(2, 4, t_q, 16, generator=torch.Generator().manual_seed(1))
    keys, values = store.materialize()
    causal = torch.ones(2, 1, t_q, 40, dtype=torch.bool).tril(40 - t_q)  # queries are the last t_q tokens
    mask = None
    if masked:  # plus left padding on row 1
        mask = causal.clone()
        mask[1, :, :, :7] = False
    # No mask means causal over the last t_q keys (transformers only omits it when that is the pattern).
    expected, _ = sdpa_attention_forward(_Module(), query, keys, values, causal if mask is None else mask, scaling=0.3)
    out, weights = kvpack_attention_forward(
        _Module(), query, KVHandle(store, "keys"), KVHandle(store, "values"), mask, scaling=0.3
    )
    assert weights is None
    assert out.shape == (2, t_q, 4, 16) and out.is_contiguous()  # (B, T_q, H_q, D), as transformers expects
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_attention_function_falls_back_to_sdpa_for_tensors():
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(2, h, 6, 16, generator=generator) for h in (4, 2, 2))
    expected = sdpa_attention_forward(_Module(), query, keys, values, None, scaling=0.25)[0]
    assert torch.equal(kvpack_attention_forward(_Module(), query, keys, values, None, scaling=0.25)[0], expected)


def test_attention_function_non_causal_without_mask_sees_every_key():
    store = _filled_store()
    query = torch.randn(2, 4, 3, 16, generator=torch.Generator().manual_seed(2))
    keys, values = store.materialize()
    expected = sdpa_attention_forward(_Module(), query, keys, values, None, is_causal=False)[0]
    out = kvpack_attention_forward(
        _Module(), query, KVHandle(store, "keys"), KVHandle(store, "values"), None, is_causal=False
    )[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dropout": 0.1}, "dropout"), ({"softcap": 30.0}, "softcap"), ({"sliding_window": 8}, "sliding_window")],
)
def test_attention_function_rejects_unsupported_options(kwargs, match):
    store = _filled_store()
    handles = KVHandle(store, "keys"), KVHandle(store, "values")
    with pytest.raises(NotImplementedError, match=match):
        kvpack_attention_forward(_Module(), torch.randn(2, 4, 1, 16), *handles, None, **kwargs)
    with pytest.raises(TypeError, match="same kvpack store"):
        other = KVHandle(_filled_store(), "values")
        kvpack_attention_forward(_Module(), torch.randn(2, 4, 1, 16), handles[0], other, None)


def test_handle_describes_the_tensor_it_stands_for():
    store = _filled_store(tokens=40)
    handle = KVHandle(store, "values")
    assert handle.shape == (2, 2, 40, 16) and handle.dtype == torch.float32
    assert torch.equal(handle.materialize(), store.materialize()[1])


# --- enable / disable -------------------------------------------------------------------------------------


def test_enable_and_disable_switch_only_this_model(tiny_llama):
    other = make_tiny_llama(seed=1)
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert enable(tiny_llama) is tiny_llama and is_enabled(tiny_llama)
    assert tiny_llama.config._attn_implementation == "kvpack"
    assert other.config._attn_implementation == "sdpa"  # no global switch
    enable(tiny_llama)  # idempotent: disable still restores sdpa
    assert disable(tiny_llama) is tiny_llama and tiny_llama.config._attn_implementation == "sdpa"
    tiny_llama.set_attn_implementation("eager")
    enable(tiny_llama)
    disable(tiny_llama)
    assert tiny_llama.config._attn_implementation == "eager"


def test_enabled_model_with_a_dynamic_cache_runs_sdpa_exactly(tiny_llama, decode_logits):
    input_ids, attention_mask = left_padded_batch()
    reference = DynamicCache(config=tiny_llama.config)
    expected, tokens = decode_logits(tiny_llama, reference, input_ids, attention_mask, steps=4)
    enable(tiny_llama)
    logits, _ = decode_logits(tiny_llama, DynamicCache(config=tiny_llama.config), input_ids, attention_mask, 4, tokens)
    assert torch.equal(logits, expected)


# --- model-level behaviour, every method x both paths -------------------------------------------------------


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("config", METHODS)
def test_fp_residual_covering_everything_equals_dynamic_cache(tiny_llama, config, fused):
    """Nothing quantized (residual_length >= total length): the compat path is bit-exact."""
    input_ids, attention_mask = left_padded_batch()
    reference = generate(
        tiny_llama,
        DynamicCache(config=tiny_llama.config),
        input_ids,
        attention_mask,
        output_logits=True,
        return_dict_in_generate=True,
    )
    set_path(tiny_llama, fused)
    cache = make_cache(tiny_llama, config, residual_length=64)
    out = generate(tiny_llama, cache, input_ids, attention_mask, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference.sequences)
    logits, expected = torch.stack(out.logits), torch.stack(reference.logits)
    if fused:
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(logits, expected)
    assert cache.get_seq_length() == input_ids.shape[1] + 12 - 1  # the last token is never fed back


@pytest.mark.parametrize("config", METHODS)
def test_fused_matches_compat(tiny_llama, config, fused_and_compat_logits):
    """Both paths on the same cache states; chunked prefill: multi-token queries over a partly quantized cache."""
    input_ids, attention_mask = left_padded_batch(lengths=(40, 29))
    cache = make_cache(tiny_llama, config)
    compat, fused = fused_and_compat_logits(tiny_llama, cache, input_ids, attention_mask, steps=24, prefill_chunks=3)
    assert cache.get_seq_length() == 64 and cache.layers[0].store.keys.num_rows >= 6
    torch.testing.assert_close(fused, compat, atol=1e-5, rtol=1e-5)


def test_a_copied_cache_follows_the_models_path(tiny_llama, decode_logits):
    input_ids, attention_mask = left_padded_batch()
    cache = make_cache(tiny_llama, "kivi", **SMALL)
    decode_logits(tiny_llama, cache, input_ids, attention_mask, steps=1)
    copied = copy.deepcopy(cache)
    assert not copied.fused
    enable(tiny_llama)
    assert copied.fused and cache.fused
    keys, values = copied.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 0)
    assert isinstance(keys, KVHandle) and keys.store is copied.layers[0].store is not cache.layers[0].store
    assert copied.get_seq_length(0) == cache.get_seq_length(0) + 1


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("config", METHODS)
def test_generate_modes_run_and_keep_the_cache_consistent(tiny_llama, config, fused):
    set_path(tiny_llama, fused)
    input_ids, attention_mask = left_padded_batch()
    width = input_ids.shape[1]

    cache = make_cache(tiny_llama, config)
    beams = generate(tiny_llama, cache, input_ids, attention_mask, num_beams=2, num_return_sequences=2)
    assert beams.shape == (4, width + 12) and cache.get_seq_length() == width + 11
    assert cache.layers[0].store._shape[0] == 4  # batch repeated for the beams

    torch.manual_seed(0)
    sampled = generate(tiny_llama, make_cache(tiny_llama, config), input_ids, attention_mask, do_sample=True, top_k=20)
    torch.manual_seed(0)
    again = generate(tiny_llama, make_cache(tiny_llama, config), input_ids, attention_mask, do_sample=True, top_k=20)
    assert torch.equal(sampled, again)


@pytest.mark.parametrize("fused", PATHS)
def test_beam_search_reorders_like_dynamic_cache(tiny_llama, fused):
    input_ids, attention_mask = left_padded_batch()
    expected = generate(tiny_llama, DynamicCache(config=tiny_llama.config), input_ids, attention_mask, num_beams=3)
    set_path(tiny_llama, fused)
    # KIVI-8 with a short residual: most of the cache is quantized, but close enough to keep the same beams.
    cache = make_cache(tiny_llama, "kivi", key_bits=8, value_bits=8, group_size=8, residual_length=8)
    assert torch.equal(generate(tiny_llama, cache, input_ids, attention_mask, num_beams=3), expected)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("residual_length", [64, 8])
def test_prompt_lookup_decoding_crops_the_cache(tiny_llama, fused, residual_length, monkeypatch):
    prompt = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    input_ids = torch.cat([prompt, prompt, prompt], dim=1)  # repetitive: prompt lookup drafts tokens
    expected = tiny_llama.generate(input_ids=input_ids, max_new_tokens=20, do_sample=False)
    set_path(tiny_llama, fused)
    crops = []
    real_crop = KVPackLayer.crop
    monkeypatch.setattr(KVPackLayer, "crop", lambda self, n: (crops.append(n), real_crop(self, n))[1])
    cache = make_cache(tiny_llama, "kivi", key_bits=8, value_bits=8, group_size=8, residual_length=residual_length)
    out = tiny_llama.generate(
        input_ids=input_ids, max_new_tokens=20, do_sample=False, cache=cache, prompt_lookup_num_tokens=4
    )
    assert any(n < 0 for n in crops), "prompt lookup never rejected a draft"
    assert cache.get_seq_length() == out.shape[1] - 1
    if residual_length == 64:  # nothing quantized: exactly greedy decoding
        assert torch.equal(out, expected)


def test_crop(tiny_llama, decode_logits):
    input_ids, attention_mask = left_padded_batch()
    cache = make_cache(tiny_llama, "kivi", **SMALL)
    decode_logits(tiny_llama, cache, input_ids, attention_mask, steps=6)
    assert cache.get_seq_length() == 26
    cache.crop(0)
    assert cache.get_seq_length() == 26
    cache.crop(-5)  # cuts into a quantized group: its survivors go back to the fp residual
    assert cache.get_seq_length() == 21
    assert all(layer.store.dequantize()[0].shape[2] == 21 for layer in cache.layers)
    with pytest.raises(ValueError, match="negative number of tokens"):
        cache.crop(10)

    # With everything in the fp residual, crop + continue is exactly DynamicCache's crop + continue.
    results = []
    fp_residual = make_cache(tiny_llama, "kivi", group_size=8, residual_length=64)
    for cache in (DynamicCache(config=tiny_llama.config), fp_residual):
        _, tokens = decode_logits(tiny_llama, cache, input_ids, attention_mask, steps=6)  # (2, 6) fed tokens
        cache.crop(-3)  # keeps the prompt and tokens[:, :3]
        assert cache.get_seq_length() == 23
        mask = torch.cat([attention_mask, torch.ones(2, 6, dtype=attention_mask.dtype)], dim=1)
        positions = attention_mask.sum(-1, keepdim=True) + 3 + torch.arange(3)  # (2, 3)
        out = tiny_llama(input_ids=tokens[:, 3:], attention_mask=mask, position_ids=positions, cache=cache)
        results.append(out.logits)
    assert torch.equal(results[0], results[1])


def test_select_and_repeat_batch_rows(tiny_llama, decode_logits):
    input_ids, attention_mask = left_padded_batch()
    cache = make_cache(tiny_llama, "kivi", **SMALL)
    decode_logits(tiny_llama, cache, input_ids, attention_mask, steps=2)
    before = [layer.store.dequantize() for layer in cache.layers]
    cache.batch_repeat_interleave(3)
    for layer, (keys, _) in zip(cache.layers, before):
        assert torch.equal(layer.store.dequantize()[0], keys.repeat_interleave(3, dim=0))
    cache.batch_select_indices(torch.tensor([5, 0]))  # rows 5 and 0: the original rows 1 and 0
    cache.reorder_cache(torch.tensor([1, 0]))
    for layer, (_, values) in zip(cache.layers, before):
        assert torch.equal(layer.store.dequantize()[1], values)
    cache.batch_select_indices(torch.tensor([False, True]))
    assert cache.layers[0].store._shape[0] == 1


@pytest.mark.parametrize("fused", PATHS)
def test_continue_generation_from_a_returned_cache(tiny_llama, fused):
    input_ids, attention_mask = left_padded_batch()
    outputs = []
    for cache in (DynamicCache(config=tiny_llama.config), None):
        if cache is None:
            set_path(tiny_llama, fused)
            cache = make_cache(tiny_llama, "kivi", group_size=8, residual_length=64)
        first = generate(tiny_llama, cache, input_ids, attention_mask, max_new_tokens=6)
        follow_up = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(4))
        ids = torch.cat([first, follow_up], dim=1)
        mask = torch.cat([attention_mask, torch.ones(2, ids.shape[1] - attention_mask.shape[1], dtype=torch.long)], 1)
        second = generate(tiny_llama, cache, ids, mask, max_new_tokens=6)
        assert cache.get_seq_length() == second.shape[1] - 1
        outputs.append(second)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("fused", PATHS)
def test_skip_layers_keep_full_precision(tiny_llama, fused, decode_logits):
    input_ids, attention_mask = left_padded_batch()
    set_path(tiny_llama, fused)
    cache = make_cache(tiny_llama, "kivi", skip_layers=(0,), **SMALL)
    decode_logits(tiny_llama, cache, input_ids, attention_mask, steps=3)
    fp_layer, kv_layer = cache.layers
    assert isinstance(fp_layer, DynamicLayer) and fp_layer.keys.shape == (2, 2, 23, 16)
    assert cache.nbytes() == 2 * fp_layer.keys.numel() * 4 + kv_layer.nbytes()  # float32 model
    assert cache.fp16_nbytes() == 2 * 2 * (2 * 2 * 23 * 16) * 2  # layers x (K, V) x B*H*T*D x 2 bytes


def test_nbytes_and_reset(tiny_llama, decode_logits):
    input_ids, attention_mask = left_padded_batch()
    cache = make_cache(tiny_llama, "kivi", **SMALL)
    first, _ = decode_logits(tiny_llama, cache, input_ids, attention_mask, steps=12)
    assert cache.nbytes() == sum(layer.store.nbytes() for layer in cache.layers)
    assert cache.fp16_nbytes() == 2 * 2 * (2 * 2 * 32 * 16) * 2  # layers x (K, V) x B*H*T*D x 2 bytes
    assert cache.nbytes() < cache.fp16_nbytes()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    again, _ = decode_logits(tiny_llama, cache, input_ids, attention_mask, steps=12)
    assert torch.equal(first, again)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", PATHS)
def test_half_precision_models(dtype, fused):
    model = set_path(make_tiny_llama().to(dtype), fused)
    input_ids, attention_mask = left_padded_batch()
    cache = make_cache(model, "kivi", **SMALL)
    out = generate(model, cache, input_ids, attention_mask, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(x).all() for x in out.logits)
    assert cache.layers[0].store.dtype == dtype and cache.layers[0].store.materialize()[0].dtype == dtype


@pytest.mark.parametrize("fused", PATHS)
def test_sliding_window_layers_are_kvpack_stores_unless_skipped(fused):
    config = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    input_ids, attention_mask = left_padded_batch()
    expected = generate(model, DynamicCache(config=model.config), input_ids, attention_mask)
    set_path(model, fused)
    cache = make_cache(model, "kivi", group_size=8, residual_length=64)
    assert [type(layer) for layer in cache.layers] == [KVPackLayer, KVPackLayer]
    assert [layer.is_sliding for layer in cache.layers] == [False, True] and cache.layers[1].get_max_length() == 8
    assert torch.equal(generate(model, cache, input_ids, attention_mask), expected)
    assert cache.layers[1].store.num_dropped > 0 and cache.layers[1].store.num_tokens < cache.get_seq_length()
    skipped = make_cache(model, "kivi", group_size=8, residual_length=64, skip_layers=[1])
    assert [type(layer) for layer in skipped.layers] == [KVPackLayer, DynamicSlidingWindowLayer]
    assert torch.equal(generate(model, skipped, input_ids, attention_mask), expected)


def test_past_key_values_spelling_still_works(tiny_llama):
    input_ids, attention_mask = left_padded_batch()
    cache = make_cache(tiny_llama, "kivi", **SMALL)
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):  # transformers 5.24: use `cache=`
        out = tiny_llama.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=4, do_sample=False
        )
    assert cache.get_seq_length() == out.shape[1] - 1


# --- CLI ------------------------------------------------------------------------------------------------------


def test_info_command(capsys):
    from kvpack.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"transformers  {transformers.__version__}" in out
    assert "default model" in out
    for name in kvpack.method_names():
        assert f"  {name} " in out


def test_generate_command_builds_the_method_config():
    from kvpack.cli import build_parser
    from kvpack.commands.generate import method_config_from_args

    parser = build_parser()
    args = parser.parse_args(["generate", "hi", "--key-bits", "4", "--scale-dtype", "none", "--no-check-finite"])
    assert method_config_from_args(args) == kvpack.KIVIConfig(key_bits=4, scale_dtype=None, check_finite=False)
    assert args.fused is True and args.max_new_tokens == 128  # the fused path by default, as in kvpack eval
    assert parser.parse_args(["generate", "hi", "--compat"]).fused is False
    with pytest.raises(ValueError, match="--sketch-dim does not apply to --method kivi"):
        method_config_from_args(parser.parse_args(["generate", "hi", "--sketch-dim", "64"]))
    with pytest.raises(ValueError, match="key_bits must be one of"):
        method_config_from_args(parser.parse_args(["generate", "hi", "--key-bits", "3"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--fused", "--compat"])
    if "qjl" in kvpack.method_names():
        args = parser.parse_args(["generate", "hi", "--method", "qjl", "--config-seed", "3", "--seed", "1", "--fused"])
        assert method_config_from_args(args).seed == 3 and args.seed == 1 and args.fused
