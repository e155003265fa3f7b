"""Sliding-window stores (``make_layer(config, sliding_window=W)``): transformers' semantics (the query at
position p reads positions p - W + 1 .. p), tokens no later query reads dropped in whole units, and every
path (fused, reference, materialized SDPA, saved states, crop, batch edits) reading only what is held.
"""

from __future__ import annotations

import pytest
import torch

from kvpack import CacheFileError, KIVIConfig, QJLConfig, TurboConfig, kernels, make_layer

from kernel_helpers import assert_close_to_exact

CONFIGS = [KIVIConfig(residual_length=32), QJLConfig(residual_length=32), TurboConfig(key_bits=4, residual_length=32)]
IDS = ("kivi", "qjl", "turbo")


def _tokens(n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 64, generator=gen) for _ in range(2)]


def _window_mask(t_q: int, total: int, window: int, first: int = 0) -> torch.Tensor:
    """bool (t_q, total - first): the last t_q of ``total`` positions over keys ``first`` .. total - 1."""
    q = torch.arange(total - t_q, total)[:, None]
    k = torch.arange(first, total)[None, :]
    return (k <= q) & (k > q - window)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_sliding_store_attends_as_a_full_store_under_the_window_mask(config):
    """W = 100 >= 2R: the drops only take whole quantized rows, so the held codes are the full store's; at
    every step (a 150-token prompt, then one token at a time) the sliding store's default mask gives the full
    store's attention under transformers' sliding mask, and it holds W - 1 .. W - 2 + unit tokens."""
    window = 100
    keys, values = _tokens()
    sliding, full = make_layer(config, sliding_window=window), make_layer(config)
    gen = torch.Generator().manual_seed(1)
    steps = [(0, 150)] + [(t, t + 1) for t in range(150, 300)]
    for start, end in steps:
        drop = sliding.pending_drop()
        dropped = sliding.num_dropped
        for layer in (sliding, full):
            layer.append(keys[:, :, start:end], values[:, :, start:end])
        assert sliding.num_dropped == dropped + drop and sliding.num_dropped % sliding.drop_unit == 0
        assert sliding.seq_length == end == full.num_tokens
        if start:  # past the prompt, the store holds what the next query reads, and at most a unit more
            assert window - 1 <= sliding.num_tokens - 1 <= window - 2 + sliding.drop_unit
        query = torch.randn(2, 9, end - start, 64, generator=gen)
        want = full.attend(query, attention_mask=_window_mask(end - start, end, window))
        torch.testing.assert_close(sliding.attend(query), want, atol=1e-5, rtol=1e-5)
    assert sliding.num_dropped > 150 and sliding.nbytes() < 0.7 * full.nbytes()  # 108 of 300 tokens held


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("queries", (1, 3, 20))
def test_a_window_shorter_than_the_residual_drops_fp_tokens_too(config, queries):
    """W = 20 < R = 32: drops reach into the fp residual and window; attention (fused, reference, and
    materialized SDPA for 20 queries) stays exact attention over what is held, under the window."""
    keys, values = _tokens(n=120)
    layer = make_layer(config, sliding_window=20)
    layer.append(keys[:, :, :40], values[:, :, :40])
    reached_fp = False  # a drop took tokens of the value window (the window then holds fewer than R)
    for t in range(40, 120 - queries, 7):
        layer.append(keys[:, :, t : t + 7], values[:, :, t : t + 7])
        reached_fp |= layer.values.fp.length < 32
    layer.append(keys[:, :, 120 - queries : 120], values[:, :, 120 - queries : 120])
    assert layer.num_dropped and reached_fp
    query = torch.randn(2, 9, queries, 64, generator=torch.Generator().manual_seed(2))
    held_k, held_v = (x.double() for x in layer.materialize())
    mask = _window_mask(queries, layer.seq_length, 20, first=layer.num_dropped)
    scores = (query.double().reshape(2, 3, -1, 64) @ held_k.transpose(-1, -2)).reshape(2, 9, queries, -1) / 8
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    exact = (weights.reshape(2, 3, -1, held_k.shape[2]) @ held_v).reshape(2, 9, queries, 64)
    with kernels.use("reference"):
        want = layer.attend(query)
    assert_close_to_exact(layer.attend(query), want, exact)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_sliding_state_saves_loads_and_is_validated(config):
    keys, values = _tokens(n=200)
    layer = make_layer(config, sliding_window=50)
    layer.append(keys[:, :, :150], values[:, :, :150])
    layer.append(keys[:, :, 150:151], values[:, :, 150:151])
    tensors, metadata = layer.state_dict()
    assert (metadata["sliding_window"], metadata["dropped"]) == (50, layer.num_dropped) and layer.num_dropped
    loaded = make_layer(config, sliding_window=50)
    loaded.load_state_dict(tensors, metadata)
    assert (loaded.seq_length, loaded.num_dropped) == (layer.seq_length, layer.num_dropped)
    for side in (layer, loaded):
        side.append(keys[:, :, 151:160], values[:, :, 151:160])
    query = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.attend(query), layer.attend(query))
    bad = {
        "window": ({**metadata, "sliding_window": 60}, "sliding_window 60"),
        "drop unit": ({**metadata, "drop_unit": 48}, "drop_unit 48"),
        "dropped off-unit": ({**metadata, "dropped": metadata["dropped"] + 1}, "multiple of"),
        "dropped bool": ({**metadata, "dropped": True}, "multiple of"),
    }
    for forged, message in bad.values():
        with pytest.raises(CacheFileError, match=message):
            make_layer(config, sliding_window=50).load_state_dict(tensors, forged)
    with pytest.raises(CacheFileError, match="metadata has fields"):  # a full layer's file, or the reverse
        make_layer(config).load_state_dict(tensors, metadata)
    # A state that dropped tokens but holds fewer than the next query reads.
    short = make_layer(config, sliding_window=50)
    short.append(keys[:, :, :20], values[:, :, :20])
    short_tensors, short_meta = short.state_dict()
    with pytest.raises(CacheFileError, match="fewer than the 49"):
        make_layer(config, sliding_window=50).load_state_dict(short_tensors, {**short_meta, "dropped": 32})


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_crop_and_batch_edits_on_a_sliding_store(config):
    keys, values = _tokens(n=200)
    layer = make_layer(config, sliding_window=50)
    layer.append(keys[:, :, :150], values[:, :, :150])
    layer.append(keys[:, :, 150:160], values[:, :, 150:160])
    held = layer.num_tokens
    before = [x.clone() for x in layer.dequantize()]
    with pytest.raises(ValueError, match="keeps at least sliding_window - 1 = 49"):
        layer.crop(48)
    assert layer.num_tokens == held and all(torch.equal(a, b) for a, b in zip(layer.dequantize(), before))
    layer.crop(held - 3)  # assisted decoding's rollback of a few tokens
    assert layer.seq_length == 157 and layer.num_tokens == held - 3
    layer.select_batch(torch.tensor([1]))
    layer.repeat_batch(2)
    assert layer.shape[0] == 2 and torch.equal(layer.dequantize()[0][0], layer.dequantize()[0][1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sliding_window=0), "sliding_window must be a positive integer"),
        (dict(sliding_window=True), "sliding_window must be a positive integer"),
        (dict(sliding_window=12.0), "sliding_window must be a positive integer"),
        (dict(sliding_window=64, drop_unit=16), "drop_unit must be a positive multiple of 32"),
        (dict(drop_unit=32), "drop_unit is only for a sliding-window layer"),
    ],
)
def test_sliding_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layer(KIVIConfig(), **kwargs)


def test_sinks_are_refused_in_a_sliding_store():
    with pytest.raises(ValueError, match="sink_tokens must be 0 in a sliding-window layer"):
        make_layer(TurboConfig(sink_tokens=4), sliding_window=64)
