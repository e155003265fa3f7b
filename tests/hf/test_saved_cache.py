"""kvpack.save_cache / kvpack.load_cache: a filled transformers cache to disk and back (prompt caching)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import kvpack  # noqa: E402
from kvpack.hf import runtime  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402


def _greedy(model, cache, next_ids, steps):
    """Greedy decode ``steps`` tokens from a filled cache; (tokens, logits per step)."""
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            cache, out = runtime.forward(model, next_ids, cache, logits_to_keep=1)
            logits.append(out[:, -1])
            next_ids = out[:, -1:].argmax(-1)
            tokens.append(next_ids)
    return torch.cat(tokens, 1), torch.stack(logits)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "config",
    [config.replace(group_size=8, residual_length=16) for config in kvpack.variants().values()],
    ids=list(kvpack.variants()),
)  # every registered method setting (the registry is the only list of methods)
def test_a_loaded_cache_continues_exactly_as_the_saved_one(tmp_path, tiny_llama, config, fused):
    if fused:
        kvpack.enable(tiny_llama)
    prompt = torch.randint(2, 128, (2, 45), generator=torch.Generator().manual_seed(0))
    cache = kvpack.make_cache(tiny_llama, config, skip_layers=(1,))  # layer 1 stays fp: saved as tensors
    with torch.no_grad():
        cache, logits = runtime.forward(tiny_llama, prompt, cache, logits_to_keep=1)
    kvpack.save_cache(cache, tmp_path / "prompt.kvpack")

    loaded = kvpack.load_cache(tiny_llama, tmp_path / "prompt.kvpack")
    assert loaded.get_seq_length() == 45 and loaded.nbytes() == cache.nbytes()
    assert type(loaded.layers[1]).__name__ == "DynamicLayer" and loaded.method_config == config
    first = logits[:, -1:].argmax(-1)
    want_tokens, want_logits = _greedy(tiny_llama, copy.deepcopy(cache), first, 20)  # crosses a flush
    got_tokens, got_logits = _greedy(tiny_llama, loaded, first, 20)
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)


def test_generate_resumes_from_a_loaded_cache(tmp_path, tiny_llama):
    kvpack.enable(tiny_llama)
    prompt = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    config = kvpack.KIVIConfig(group_size=8, residual_length=16)
    whole = runtime.generate(tiny_llama, kvpack.make_cache(tiny_llama, config), input_ids=prompt, max_new_tokens=8,
                             do_sample=False)  # fmt: skip
    cache = kvpack.make_cache(tiny_llama, config)
    with torch.no_grad():
        runtime.forward(tiny_llama, prompt[:, :-1], cache)  # the prompt but its last token
    kvpack.save_cache(cache, tmp_path / "c.kvpack")
    resumed = runtime.generate(tiny_llama, kvpack.load_cache(tiny_llama, tmp_path / "c.kvpack"), input_ids=prompt,
                               max_new_tokens=8, do_sample=False)  # fmt: skip
    assert torch.equal(resumed, whole)


def test_bad_saves_and_loads_are_rejected(tmp_path, tiny_llama):
    with pytest.raises(TypeError, match="takes a KVPackCache"):
        kvpack.save_cache(runtime.dynamic_cache(tiny_llama), tmp_path / "x")
    with pytest.raises(ValueError, match="holds no tokens"):
        kvpack.save_cache(kvpack.make_cache(tiny_llama, "kivi", group_size=8, residual_length=16), tmp_path / "x")
    cache = kvpack.make_cache(tiny_llama, kvpack.KIVIConfig(group_size=8, residual_length=16))
    with torch.no_grad():
        runtime.forward(tiny_llama, torch.randint(2, 128, (1, 20)), cache)
    kvpack.save_cache(cache, tmp_path / "c.kvpack")
    other = make_tiny_llama(num_key_value_heads=4)
    with pytest.raises(ValueError, match="saved for a model with"):
        kvpack.load_cache(other, tmp_path / "c.kvpack")
    layer = kvpack.make_layer(kvpack.KIVIConfig(group_size=8, residual_length=16))
    layer.append(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    kvpack.io.save_layers(tmp_path / "layers.kvpack", [layer])
    with pytest.raises(ValueError, match="not a saved cache"):
        kvpack.load_cache(tiny_llama, tmp_path / "layers.kvpack")


def test_per_layer_configs_are_applied_saved_and_loaded(tmp_path, tiny_llama):
    """``layer_configs``: layer 0 at 4 bits with sinks, layer 1 another method; the file carries them and the
    loaded cache continues exactly; a file refused if its layers' configs disagree with its header."""
    kvpack.enable(tiny_llama)
    base = kvpack.KIVIConfig(group_size=8, residual_length=16)
    per_layer = {0: kvpack.TurboConfig(key_bits=4, group_size=8, residual_length=16, sink_tokens=2),
                 1: base.replace(key_bits=4, value_bits=4)}  # fmt: skip
    cache = kvpack.make_cache(tiny_llama, base, layer_configs=per_layer)
    assert [layer.store.config for layer in cache.layers] == [per_layer[0], per_layer[1]]
    assert cache.config_of(0) == per_layer[0] and cache.layer_configs == per_layer
    prompt = torch.randint(2, 128, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache, logits = runtime.forward(tiny_llama, prompt, cache, logits_to_keep=1)
    kvpack.save_cache(cache, tmp_path / "layers.kvpack")
    loaded = kvpack.load_cache(tiny_llama, tmp_path / "layers.kvpack")
    assert loaded.layer_configs == per_layer and loaded.method_config == base
    first = logits[:, -1:].argmax(-1)
    want_tokens, want_logits = _greedy(tiny_llama, copy.deepcopy(cache), first, 20)
    got_tokens, got_logits = _greedy(tiny_llama, loaded, first, 20)
    assert torch.equal(got_tokens, want_tokens) and torch.equal(got_logits, want_logits)
    # the same layers saved under a header without the per-layer configs: refused, naming the layer
    plain = kvpack.make_cache(tiny_llama, base)
    with torch.no_grad():
        plain, _ = runtime.forward(tiny_llama, prompt, plain, logits_to_keep=1)
    plain.layers = cache.layers
    kvpack.save_cache(plain, tmp_path / "forged.kvpack")
    with pytest.raises(kvpack.CacheFileError, match="layer 0"):
        kvpack.load_cache(tiny_llama, tmp_path / "forged.kvpack")


def test_bad_layer_configs_are_refused(tiny_llama):
    base = kvpack.KIVIConfig(group_size=8, residual_length=16)
    with pytest.raises(ValueError, match="layer_configs must be layer indices"):
        kvpack.make_cache(tiny_llama, base, layer_configs={2: base})
    with pytest.raises(ValueError, match="both skipped and given a config"):
        kvpack.make_cache(tiny_llama, base, skip_layers=(0,), layer_configs={0: base})
    with pytest.raises(TypeError, match="layer_configs\\[0\\] must be a kvpack MethodConfig"):
        kvpack.make_cache(tiny_llama, base, layer_configs={0: {"method": "kivi"}})
    with pytest.raises(ValueError, match="group_size 32 must divide"):
        kvpack.make_cache(tiny_llama, base, layer_configs={1: kvpack.KIVIConfig()})


def test_forged_per_layer_configs_in_the_header_are_refused_or_change_nothing(tmp_path, tiny_llama):
    """Every leaf of the header's ``layer_configs`` changed or removed (digests recomputed, as a forger would):
    the file is refused with a CacheFileError, or loads a cache whose next step is the original's."""
    import json

    from forgery_cases import leaf_edits, read_file, write_forged

    base = kvpack.KIVIConfig(group_size=8, residual_length=16)
    cache = kvpack.make_cache(tiny_llama, base, layer_configs={1: base.replace(key_bits=4, sink_tokens=2)})
    prompt = torch.randint(2, 128, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache, logits = runtime.forward(tiny_llama, prompt, cache, logits_to_keep=1)
    kvpack.save_cache(cache, tmp_path / "c.kvpack")
    tensors, metadata = read_file(tmp_path / "c.kvpack")
    extra = json.loads(metadata["extra"])
    first = logits[:, -1:].argmax(-1)
    want, _ = _greedy(tiny_llama, copy.deepcopy(cache), first, 3)
    edits = [(path, new) for path, new in leaf_edits(extra["layer_configs"])]
    assert len(edits) > 30
    for path, new in [*edits, (("<removed all>",), None)]:
        header = {**extra, "layer_configs": new} if new is not None else {k: v for k, v in extra.items()
                                                                        if k != "layer_configs"}  # fmt: skip
        write_forged(tmp_path / "f.kvpack", tensors, {**metadata, "extra": json.dumps(header)})
        try:
            loaded = kvpack.load_cache(tiny_llama, tmp_path / "f.kvpack")
        except kvpack.CacheFileError:
            continue
        got, _ = _greedy(tiny_llama, loaded, first, 3)
        assert torch.equal(got, want), path


def test_tensor_parallel_shards_in_a_single_process_are_refused(tmp_path, tiny_llama):
    """A cache whose layers hold half the kv heads (a TP rank's) is not saved without a process group, and a
    file marked as one rank's shard (or with a malformed shard) is refused in a single process, saying why."""
    import json

    from forgery_cases import read_file, write_forged

    cache = kvpack.make_cache(tiny_llama, kvpack.KIVIConfig(group_size=8, residual_length=16))
    shard = torch.randn(1, 1, 20, 16)  # 1 of the model's 2 kv heads
    for i in range(len(cache.layers)):
        cache.update(shard, shard, i)
    with pytest.raises(ValueError, match="hold 1 of the model's 2 kv heads, but no torch.distributed"):
        kvpack.save_cache(cache, tmp_path / "shard.kvpack")
    whole = kvpack.make_cache(tiny_llama, kvpack.KIVIConfig(group_size=8, residual_length=16))
    prompt = torch.randint(2, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, _ = runtime.forward(tiny_llama, prompt, whole, logits_to_keep=1)
    kvpack.save_cache(whole, tmp_path / "c.kvpack")
    assert "tp" not in json.loads(read_file(tmp_path / "c.kvpack")[1]["extra"])  # single-process files unchanged
    tensors, metadata = read_file(tmp_path / "c.kvpack")
    extra = json.loads(metadata["extra"])
    for tp, message in [({"size": 2, "rank": 1}, "saved by rank 1 of a tensor-parallel model of size 2"),
                        ({"size": 2, "rank": 2}, "invalid tensor-parallel shard"),
                        ({"size": 3, "rank": 0}, "invalid tensor-parallel shard"),  # 3 does not divide 2 heads
                        ({"size": True, "rank": 0}, "invalid tensor-parallel shard"),
                        ([2, 0], "invalid tensor-parallel shard")]:  # fmt: skip
        write_forged(tmp_path / "f.kvpack", tensors, {**metadata, "extra": json.dumps({**extra, "tp": tp})})
        with pytest.raises(kvpack.CacheFileError, match=message):
            kvpack.load_cache(tiny_llama, tmp_path / "f.kvpack")
