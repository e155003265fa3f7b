"""Attention sinks (``sink_tokens``): the first S tokens of a layer stay in full precision, the stores hold the
rest exactly as a sink-less layer fed the same tokens would, and every path (fused C++ and Triton, reference,
materialized SDPA, crop, batch edits, saved states) reads them in position order."""

from __future__ import annotations

import pytest
import torch

from kvpack import CacheFileError, KIVIConfig, QJLConfig, TurboConfig, kernels, make_layer

from kernel_helpers import assert_close_to_exact, exact_attention, filled_layer

CONFIGS = [KIVIConfig(residual_length=32), QJLConfig(residual_length=32), TurboConfig(key_bits=4, residual_length=32)]
IDS = ("kivi", "qjl", "turbo")


def _tokens(batch=2, n=100, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, n, 64, generator=gen).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_sinks_are_exact_and_the_stores_hold_what_a_sinkless_layer_holds(config):
    keys, values = _tokens()
    layer = filled_layer(config.replace(sink_tokens=4), keys, values)
    plain = filled_layer(config, keys[:, :, 4:], values[:, :, 4:], prompt=66)
    assert layer.num_tokens == 100 and layer.num_sinks == 4
    k_hat, v_hat = layer.dequantize()
    assert torch.equal(k_hat[:, :, :4], keys[:, :, :4]) and torch.equal(v_hat[:, :, :4], values[:, :, :4])
    k_plain, v_plain = plain.dequantize()
    assert torch.equal(k_hat[:, :, 4:], k_plain) and torch.equal(v_hat[:, :, 4:], v_plain)
    sink_bytes = 2 * keys[:, :, :4].numel() * 4
    assert layer.nbytes() == plain.nbytes() + sink_bytes


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("queries", (1, 3))
def test_attention_with_sinks_matches_exact_attention_on_every_path(config, queries):
    """Fused (C++), reference and (3 queries: the causal tail) with a left-padding mask: within 2x the
    reference's error of float64 attention over what the step reads, sinks in front."""
    keys, values = _tokens()
    layer = filled_layer(config.replace(sink_tokens=4), keys, values)
    total = layer.num_tokens
    query = torch.randn(2, 9, queries, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 1, queries, total, dtype=torch.bool).tril(total - queries)
    mask[1, ..., :2] = False  # row 1 left-padded over two of its sinks
    exact = exact_attention(layer, query, mask, 64**-0.5).double()
    with kernels.use("reference"):
        want = layer.attend(query, attention_mask=mask)
    assert_close_to_exact(layer.attend(query, attention_mask=mask), want, exact)
    many = torch.randn(2, 9, 20, 64)  # the materialized SDPA path
    exact_many = exact_attention(layer, many, torch.ones(20, total, dtype=torch.bool).tril(total - 20), 64**-0.5)
    torch.testing.assert_close(layer.attend(many), exact_many, rtol=1e-4, atol=1e-5)
    scores = layer.scores(query)
    k_hat, _ = layer.materialize()
    torch.testing.assert_close(scores, query @ k_hat.repeat_interleave(3, 1).float().transpose(-1, -2),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_a_prompt_shorter_than_the_sinks_fills_them_over_several_appends():
    keys, values = _tokens(n=12)
    layer = make_layer(KIVIConfig(group_size=8, residual_length=8, sink_tokens=5))
    for t in range(0, 12, 2):
        layer.append(keys[:, :, t : t + 2], values[:, :, t : t + 2])
        assert layer.num_sinks == min(t + 2, 5) and layer.num_tokens == t + 2
    k_hat, _ = layer.dequantize()
    assert torch.equal(k_hat[:, :, :5], keys[:, :, :5]) and torch.equal(k_hat[:, :, 5:], keys[:, :, 5:])  # fp yet


def test_crop_batch_edits_and_saved_states_keep_the_sinks():
    keys, values = _tokens()
    config = TurboConfig(key_bits=4, residual_length=32, sink_tokens=4)
    layer = filled_layer(config, keys, values)
    tensors, metadata = layer.state_dict()
    loaded = make_layer(config)
    loaded.load_state_dict(tensors, metadata)
    for x, y in zip(loaded.dequantize(), layer.dequantize()):
        assert torch.equal(x, y)
    step = [x[:, :, -1:] * 0.5 for x in (keys, values)]
    loaded.append(*step)  # the next step reads the same state (the last flush's fp view is not saved)
    layer.append(*step)
    query = torch.randn(2, 9, 1, 64)
    assert torch.equal(loaded.attend(query), layer.attend(query))
    layer.select_batch(torch.tensor([1]))
    assert layer.dequantize()[0].shape[0] == 1
    assert torch.equal(layer.dequantize()[0][:, :, :4], keys[1:, :, :4])
    layer.crop(3)
    assert layer.num_tokens == 3 and layer.num_sinks == 3
    layer.append(keys[1:, :, 3:10], values[1:, :, 3:10])  # the sinks fill again first
    assert layer.num_sinks == 4 and torch.equal(layer.dequantize()[0], keys[1:, :, :10])


@pytest.mark.parametrize(
    "forge, match",
    [
        (lambda t, m: m.update(sinks=5), "sinks must be an integer"),
        (lambda t, m: t.update({"sinks.keys": t["sinks.keys"][:, :, :3]}), "sinks.keys is"),
        (lambda t, m: t["sinks.values"].view(-1).__setitem__(0, float("nan")), "NaN"),
        (lambda t, m: (m.update(sinks=0), t.pop("sinks.keys"), t.pop("sinks.values")), "not all 4 sink tokens"),
        (lambda t, m: m.pop("sinks"), "metadata has fields"),
    ],
    ids=("too-many", "short-tensor", "nan", "missing", "no-field"),
)
def test_forged_sinks_are_refused(forge, match):
    keys, values = _tokens()
    config = KIVIConfig(residual_length=32, sink_tokens=4)
    tensors, metadata = filled_layer(config, keys, values).state_dict()
    tensors = {name: t.clone() for name, t in tensors.items()}
    forge(tensors, metadata)
    with pytest.raises(CacheFileError, match=match):
        make_layer(config).load_state_dict(tensors, metadata)


def test_sink_tokens_is_validated_and_off_by_default():
    assert KIVIConfig().sink_tokens == QJLConfig().sink_tokens == TurboConfig().sink_tokens == 0
    for bad in (-1, 2.0, True, 10**6):
        with pytest.raises(ValueError, match="sink_tokens"):
            KIVIConfig(sink_tokens=bad)
