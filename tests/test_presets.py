"""Presets (:mod:`kvpack.presets`): named recipes that make_cache, ``kvpack generate --preset`` and the
evaluation's default matrix take, with their per-layer settings applied to a model of any depth."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import kvpack
from kvpack import presets
from kvpack.eval import memory_footprint
from kvpack.eval.matrix import MethodSpec, default_methods

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")


def test_presets_are_valid_distinct_and_not_method_names():
    assert presets.names() and len(set(presets.names())) == len(presets.names())
    assert not set(presets.names()) & set(kvpack.method_names())
    for preset in presets.PRESETS.values():
        assert isinstance(preset.config, kvpack.MethodConfig) and preset.summary
        for n in (1, 3, 30):
            layers = preset.layer_configs(n)
            assert all(0 <= i < n for i in layers) and all(isinstance(c, kvpack.MethodConfig) for c in layers.values())
            assert not set(layers) & set(preset.skip_layers(n))
        assert kvpack.KIVIConfig().sink_tokens == 0  # the papers' methods stay as they are


@needs_transformers
@pytest.mark.parametrize("name", presets.names())
def test_make_cache_applies_a_preset_and_generates(name):
    from kvpack.hf import loading, runtime

    model = loading.random_llama(dict(hidden_size=128, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=64),
                                 torch.float32)  # fmt: skip
    preset = presets.PRESETS[name]
    cache = kvpack.make_cache(model, name)
    assert cache.method_config == preset.config and cache.layer_configs == preset.layer_configs(3)
    for i, layer in enumerate(cache.layers):
        if i not in preset.skip_layers(3):
            assert layer.store.config == preset.layer_configs(3).get(i, preset.config)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    out = runtime.generate(model, cache, input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 43) and cache.get_seq_length() == 42
    # Overrides apply to every config of the preset (base and per-layer), validated.
    cache = kvpack.make_cache(model, name, residual_dtype="float16")
    assert cache.method_config == preset.config.replace(residual_dtype="float16")
    assert cache.layer_configs == {i: c.replace(residual_dtype="float16") for i, c in preset.layer_configs(3).items()}
    with pytest.raises(ValueError, match="unknown TurboConfig fields"):
        kvpack.make_cache(model, name, bits=2)
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        kvpack.make_cache(model, name, residual_dtype="float32")


def test_the_eval_matrix_holds_every_preset_with_its_per_layer_memory():
    specs = {spec.label: spec for spec in default_methods()}
    for name, preset in presets.PRESETS.items():
        spec = specs[name]
        assert spec.preset == name and spec.config == preset.config
        assert MethodSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="preset must be one of"):
        MethodSpec.from_dict({"preset": "kv2"})
    base = kvpack.TurboConfig(key_bits=4, sink_tokens=4)
    per_layer = {0: base.replace(value_bits=4)}
    mixed = memory_footprint(base, [300], layers=3, kv_heads=2, head_dim=64, layer_configs=per_layer)[0]
    plain = memory_footprint(base, [300], layers=1, kv_heads=2, head_dim=64)[0]
    richer = memory_footprint(base.replace(value_bits=4), [300], layers=1, kv_heads=2, head_dim=64)[0]
    assert mixed.nbytes == 2 * plain.nbytes + richer.nbytes
    skipped = memory_footprint(base, [300], layers=3, kv_heads=2, head_dim=64, skip_layers=(1,))[0]
    assert skipped.nbytes == 2 * plain.nbytes + 2 * 2 * 300 * 64 * 2  # an fp16 layer


def test_generate_refuses_a_preset_with_method_flags(capsys):
    from kvpack.cli import main

    assert main(["generate", "hi", "--preset", "kv3", "--key-bits", "2"]) == 2
    assert "--preset sets the method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--preset", "kv9"])
