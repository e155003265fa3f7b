"""``residual_dtype``: a float32 model's fp parts (key residual, value window, sinks) held in 16 bits.

A layer fed float32 tokens with ``residual_dtype="float16"`` must hold exactly what a default layer fed the
same tokens rounded to float16 holds (same codes, same fp tokens), read them back in float32, and save, load,
crop and attend through every path; 16-bit models are unaffected; a value past float16's range is refused
with a message that names the setting, and nothing is stored.
"""

from __future__ import annotations

import pytest
import torch

from kvpack import CacheFileError, KIVIConfig, QJLConfig, TurboConfig, kernels, make_layer

from kernel_helpers import assert_close_to_exact, exact_attention, filled_layer

CONFIGS = [
    KIVIConfig(residual_length=32, sink_tokens=4),
    QJLConfig(residual_length=32, sink_tokens=4),
    TurboConfig(key_bits=4, residual_length=32, sink_tokens=4),
]
IDS = ("kivi", "qjl", "turbo")
HALF = ("float16", "bfloat16")


def _tokens(n=100, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, n, 64, generator=gen) * 3).to(dtype) for _ in range(2)]


def _fp_elements(layer) -> int:
    """Elements held in fp: residual, window, sinks."""
    n = layer.keys.fp.length + layer.values.fp.length + 2 * layer.num_sinks
    batch, heads, dim = layer.shape
    return n * batch * heads * dim


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("half", HALF)
def test_a_16_bit_residual_holds_what_a_layer_fed_rounded_tokens_holds(config, half):
    keys, values = _tokens()
    layer = filled_layer(config.replace(residual_dtype=half), keys, values)
    dtype = getattr(torch, half)
    rounded = filled_layer(config, *(x.to(dtype).float() for x in (keys, values)))
    assert layer.dtype == torch.float32 and layer.fp_dtype == dtype
    assert layer.keys.fp.data.dtype == layer.values.fp.data.dtype == dtype
    for got, want in zip(layer.dequantize(), rounded.dequantize()):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    # The fp parts take half the bytes; the quantized rows are unchanged.
    assert layer.nbytes() == rounded.nbytes() - 2 * _fp_elements(layer)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("queries", (1, 3))
def test_attention_over_a_16_bit_residual_is_exact_attention_over_what_it_holds(config, queries):
    """Fused (C++) and reference decode, materialized SDPA (3 queries), with a mask: within 2x the
    reference's error of float64 attention over the float32 reconstruction."""
    keys, values = _tokens()
    layer = filled_layer(config.replace(residual_dtype="float16"), keys, values)
    total = layer.num_tokens
    query = torch.randn(2, 9, queries, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 1, queries, total, dtype=torch.bool).tril(total - queries)
    mask[1, ..., :3] = False
    exact = exact_attention(layer, query, mask, 64**-0.5).double()
    with kernels.use("reference"):
        want = layer.attend(query, attention_mask=mask)
    got = layer.attend(query, attention_mask=mask)
    assert got.dtype == torch.float32
    assert_close_to_exact(got, want, exact)
    many = layer._attend_materialized(query, 64**-0.5, mask)
    assert_close_to_exact(many, want, exact)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_16_bit_models_keep_their_own_dtype(config):
    keys, values = _tokens(dtype=torch.bfloat16)
    layer = filled_layer(config.replace(residual_dtype="float16"), keys, values)
    plain = filled_layer(config, keys, values)
    assert layer.fp_dtype == torch.bfloat16 and layer.keys.fp.data.dtype == torch.bfloat16
    for got, want in zip(layer.dequantize(), plain.dequantize()):
        assert torch.equal(got, want)
    assert layer.nbytes() == plain.nbytes()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_save_load_and_crop_keep_the_16_bit_parts(config):
    keys, values = _tokens()
    config = config.replace(residual_dtype="float16")
    layer = filled_layer(config, keys, values)
    tensors, metadata = layer.state_dict()
    assert metadata["dtype"] == "float32"
    assert tensors["keys.residual"].dtype == tensors["sinks.values"].dtype == torch.float16
    loaded = make_layer(config)
    loaded.load_state_dict(tensors, metadata)
    for got, want in zip(loaded.dequantize(), layer.dequantize()):
        assert torch.equal(got, want)
    # A file whose fp parts are not what the config holds is refused (here: float32 residual).
    forged = {**tensors, "keys.residual": tensors["keys.residual"].float()}
    with pytest.raises(CacheFileError, match="keys.residual is torch.float32"):
        make_layer(config).load_state_dict(forged, metadata)
    # A crop into a key group puts its reconstruction back into the fp part, in float16.
    layer.crop(50)
    assert layer.keys.fp.data.dtype == torch.float16 and layer.num_tokens == 50
    k_hat, _ = layer.dequantize()
    assert k_hat.dtype == torch.float32 and torch.isfinite(k_hat).all()
    layer.append(keys[:, :, :1], values[:, :, :1])
    assert layer.num_tokens == 51


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_values_past_float16_range_are_refused_and_nothing_is_stored(config):
    keys, values = _tokens()
    layer = filled_layer(config.replace(residual_dtype="float16"), keys, values)
    before = [x.clone() for x in layer.dequantize()]
    for n in (1, 40):  # the fast one-token append and the torch path (a flush)
        big = keys[:, :, :n].clone()
        big[0, 1, -1, 5] = 1e6
        with pytest.raises(ValueError, match="exceed the range of torch.float16.*residual_dtype='float16'"):
            layer.append(big, values[:, :, :n])
        assert layer.num_tokens == 100
        assert all(torch.equal(a, b) for a, b in zip(layer.dequantize(), before))
    nan = keys[:, :, :1].clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="keys contain 1 NaN/Inf"):  # the input's own NaN is named as such
        layer.append(nan, values[:, :, :1])
    fresh = make_layer(config.replace(residual_dtype="float16"))
    with pytest.raises(ValueError, match="exceed the range"):
        fresh.append(keys * 1e5, values)
    assert fresh.shape is None and fresh.num_tokens == 0  # a refused first append leaves it empty
    layer = make_layer(config.replace(residual_dtype="bfloat16"))
    layer.append(keys[:, :, :20] * 1e5, values[:, :, :20])  # bfloat16 holds any float32 value (in fp: < R tokens)
    assert torch.isfinite(layer.dequantize()[0]).all() and layer.num_tokens == 20


@pytest.mark.parametrize("cls", (KIVIConfig, QJLConfig, TurboConfig), ids=IDS)
@pytest.mark.parametrize("bad", ("float32", "fp16", None, 16, torch.float16))
def test_residual_dtype_is_validated(cls, bad):
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        cls(residual_dtype=bad)
