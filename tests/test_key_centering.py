"""``key_centering``: a per-(kv head, channel) key mean, taken from a layer's first append, subtracted from every
stored key. Softmax does not see it (every score of a query moves by q.mu), so attention is unchanged in
exact arithmetic and only the quantizer sees smaller keys; that is what protects rotated and sketched keys
from huge k_proj biases (Qwen2.5 measures bias norms of 600 - 900 against a key spread of ~22).
"""

from __future__ import annotations

import pytest
import torch

from kvpack import CacheFileError, KIVIConfig, QJLConfig, TurboConfig, kernels, make_layer

from kernel_helpers import assert_close_to_exact, exact_attention

CONFIGS = [KIVIConfig(), QJLConfig(), TurboConfig(key_bits=4)]
IDS = ("kivi", "qjl", "turbo")
BIAS_NORM = 700.0  # the dominating k_proj bias of a Qwen2.5 layer


def _keys(seed=0, tokens=300, biased_heads=(1,)):
    """Keys with the per-channel spread of real ones (a few outlier channels, ~22 RMS norm), values, and
    the same keys plus a bias of norm 700 in ``biased_heads``."""
    gen = torch.Generator().manual_seed(seed)
    channel = torch.ones(64)
    channel[:4] = 4.0
    keys = torch.randn(2, 3, tokens, 64, generator=gen) * channel * 2.5
    values = torch.randn(2, 3, tokens, 64, generator=gen)
    bias = torch.zeros(1, 3, 1, 64)
    for h in biased_heads:
        direction = torch.randn(64, generator=gen)
        bias[0, h, 0] = direction / direction.norm() * BIAS_NORM
    return keys, values, keys + bias


def _exact(keys, values, query):
    """float64 softmax attention (scale D^-0.5), GQA: 9 query heads over 3 kv heads."""
    q = query.double().reshape(2, 3, 3, 64)
    weights = torch.softmax(q @ keys.double().transpose(-1, -2) / 8, -1)
    return (weights @ values.double()).reshape(2, 9, 1, 64)


def _error(config, keys, values, query) -> torch.Tensor:
    """Per kv head, the worst |attention - exact| of a 300-token layer (299 prompt + 1 decode step)."""
    layer = make_layer(config)
    layer.append(keys[:, :, :299], values[:, :, :299])
    layer.append(keys[:, :, 299:], values[:, :, 299:])
    return (layer.attend(query).double() - _exact(keys, values, query)).reshape(2, 3, 3, 64).abs().amax(dim=(0, 2, 3))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_auto_centering_keeps_a_biased_head_as_accurate_as_an_ordinary_one(config):
    """A bias of norm 700 in head 1 changes no exact attention output (q.b is the same for every key); with
    "auto" every method's error in that head stays within 1.5x of its error on the unbiased keys, while the
    other heads are left as they are (no offset). Without centering the rotated (turbo) and sketched (QJL)
    keys lose most of their precision to the bias."""
    keys, values, biased = _keys()
    query = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_exact(keys, values, query), _exact(biased, values, query), atol=1e-4, rtol=0)
    ordinary = _error(config, keys, values, query)
    centered = _error(config.replace(key_centering="auto"), biased, values, query)
    assert centered[1] <= 1.5 * ordinary[1] + 1e-3, (centered, ordinary)
    assert torch.allclose(centered[[0, 2]], ordinary[[0, 2]], rtol=1e-3, atol=1e-5)  # heads 0, 2 untouched
    plain = _error(config, biased, values, query)
    if config.method in ("qjl", "turbo"):
        assert plain[1] > 3 * ordinary[1], (plain, ordinary)  # what centering buys (the test can fail)
    layer = make_layer(config.replace(key_centering="auto"))
    layer.append(biased, values)
    assert layer.key_offset[0, [0, 2]].abs().max() == 0 and layer.key_offset[0, 1].norm() > 0.9 * BIAS_NORM


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_centered_layer_reads_back_its_keys_and_attends_exactly(config):
    """ "on": dequantize/materialize give the keys themselves (offset added back), scores are q.k, and every
    path (fused, reference, materialized SDPA) is exact attention over what the step reads."""
    _, values, biased = _keys(tokens=100)
    config = config.replace(key_centering="on", residual_length=32, sink_tokens=4)
    layer = make_layer(config)
    layer.append(biased[:, :, :70], values[:, :, :70])
    for t in range(70, 100):
        layer.append(biased[:, :, t : t + 1], values[:, :, t : t + 1])
    k_hat, _ = layer.dequantize()
    # sinks: the fp keys, back from their centered copy (float32 rounding of k - mu + mu at |k| ~ 700)
    torch.testing.assert_close(k_hat[:, :, :4], biased[:, :, :4], atol=1e-4, rtol=0)
    assert (k_hat - biased).abs().max() < 0.25 * biased.abs().max()
    for queries in (1, 3, 20):
        query = torch.randn(2, 9, queries, 64, generator=torch.Generator().manual_seed(queries))
        mask = torch.ones(2, 1, queries, 100, dtype=torch.bool).tril(100 - queries)
        mask[1, ..., :6] = False
        exact = exact_attention(layer, query, mask, 64**-0.5).double()
        with kernels.use("reference"):
            want = layer.attend(query, attention_mask=mask)
        assert_close_to_exact(layer.attend(query, attention_mask=mask), want, exact)
    query = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(9))
    scores = (query.reshape(2, 3, 3, 64) @ layer.materialize()[0].transpose(-1, -2)).reshape(2, 9, 1, -1)
    if config.method != "qjl":  # QJL's scores are the sketch's estimates, not q.k_hat
        torch.testing.assert_close(layer.scores(query), scores, rtol=1e-4, atol=2e-2)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_centered_state_saves_loads_and_is_validated(config):
    _, values, biased = _keys(tokens=200)
    config = config.replace(key_centering="on")
    layer = make_layer(config)
    layer.append(biased[:, :, :150], values[:, :, :150])
    tensors, metadata = layer.state_dict()
    assert metadata["key_offset"] is True and tensors["offset.keys"].shape == (1, 3, 1, 64)
    loaded = make_layer(config)
    loaded.load_state_dict(tensors, metadata)
    query = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(3))
    for side in (layer, loaded):
        side.append(biased[:, :, 150:151], values[:, :, 150:151])
    assert torch.equal(loaded.attend(query), layer.attend(query))
    assert torch.equal(loaded.dequantize()[0], layer.dequantize()[0])
    rest = {k: v for k, v in tensors.items() if k != "offset.keys"}
    forged = {
        "missing": (rest, metadata, "offset.keys is None"),
        "shape": ({**rest, "offset.keys": torch.zeros(1, 3, 64)}, metadata, "expected torch.float32"),
        "dtype": ({**rest, "offset.keys": tensors["offset.keys"].half()}, metadata, "expected torch.float32"),
        "nan": ({**rest, "offset.keys": torch.full((1, 3, 1, 64), float("nan"))}, metadata, "NaN/Inf"),
        "flag": (tensors, {**metadata, "key_offset": 1}, "must be true or false"),
        "extra": (tensors, {**metadata, "key_offset": False}, "holds a key offset but"),
    }
    for forged_tensors, forged_metadata, message in forged.values():
        with pytest.raises(CacheFileError, match=message):
            make_layer(config).load_state_dict(forged_tensors, forged_metadata)


def test_short_first_appends_and_off_configs_take_no_offset():
    _, values, biased = _keys(tokens=40)
    layer = make_layer(KIVIConfig(key_centering="on", sink_tokens=30))
    layer.append(biased, values)  # 10 tokens after the sinks: fewer than 16, no mean is taken
    assert layer.key_offset is None
    plain = make_layer(KIVIConfig())
    plain.append(biased, values)
    assert plain.key_offset is None and "key_offset" not in plain.state_dict()[1]  # old files unchanged


@pytest.mark.parametrize("bad", ("yes", True, None, 1))
def test_key_centering_is_validated(bad):
    with pytest.raises(ValueError, match="key_centering must be one of"):
        TurboConfig(key_centering=bad)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_centering_with_a_16_bit_residual_holds_every_fp_part_in_16_bits(config):
    """Centering converts the keys on its own; the values, the window and the sinks must follow residual_dtype
    too (a saved state is checked against it)."""
    _, values, biased = _keys(tokens=100)
    layer = make_layer(config.replace(key_centering="on", residual_dtype="bfloat16", sink_tokens=4, residual_length=32))
    layer.append(biased[:, :, :70], values[:, :, :70])
    layer.append(biased[:, :, 70:71], values[:, :, 70:71])
    tensors, metadata = layer.state_dict()
    for name in ("keys.residual", "values.window", "sinks.keys", "sinks.values"):
        assert tensors[name].dtype == torch.bfloat16, name
    make_layer(layer.config).load_state_dict(tensors, metadata)
