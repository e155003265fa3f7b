"""The one state machine (kvpack.store) for every method: atomic appends with exact rollback, the
many-rows SDPA path, storage shrinking, masks, devices, housekeeping and the public layer properties."""

import pytest
import torch

import kvpack
from kvpack import KIVIConfig, make_layer
from kvpack.kernels import tokens

from conftest import make_kv


def _snapshot(layer):
    tensors, metadata = layer.state_dict()
    return {name: t.clone() for name, t in tensors.items()}, metadata


@pytest.mark.parametrize("method", kvpack.method_names())
@pytest.mark.parametrize("chunk", [10, 200])  # 200: the key residual's prompt-sized storage is also replaced
def test_value_failure_after_a_key_flush_stores_nothing_of_that_append(method, chunk):
    """Keys flush a block, then the values' flush overflows float16: the layer must be exactly as before."""
    config = kvpack.config_class(method)(group_size=8, residual_length=8)
    keys, values = make_kv(batch=1, heads=2, tokens=4 + chunk + 10, seed=3)
    layer = kvpack.make_layer(config)
    layer.append(keys[:, :, :4], values[:, :, :4])
    before = _snapshot(layer)
    bad_values = values[:, :, 4 : 4 + chunk].clone()
    bad_values[:, :, 0] *= 1e6  # leaves the value window in this append: its scale overflows float16
    with pytest.raises(ValueError, match="overflow"):
        layer.append(keys[:, :, 4 : 4 + chunk], bad_values)  # keys: whole blocks of 8 flushed fine
    assert layer.num_tokens == layer.values.num_tokens == 4
    after = _snapshot(layer)
    assert after[1] == before[1] and after[0].keys() == before[0].keys()
    for name in before[0]:
        assert torch.equal(after[0][name], before[0][name]), name

    # The layer goes on as if the failed call never happened.
    layer.append(keys[:, :, 4:], values[:, :, 4:])
    reference = kvpack.make_layer(config)
    reference.append(keys[:, :, :4], values[:, :, :4])
    reference.append(keys[:, :, 4:], values[:, :, 4:])
    got, want = _snapshot(layer), _snapshot(reference)
    assert got[1] == want[1] and got[0].keys() == want[0].keys()
    for name in want[0]:
        assert torch.equal(got[0][name], want[0][name]), name


@pytest.mark.parametrize("method", kvpack.method_names())
def test_a_failed_first_append_leaves_the_layer_empty(method):
    config = kvpack.config_class(method)(group_size=8, residual_length=8)
    keys, values = make_kv(batch=2, heads=2, tokens=12, seed=4)
    values[:, :, 0] *= 1e6
    layer = kvpack.make_layer(config)
    with pytest.raises(ValueError, match="overflow"):
        layer.append(keys, values)
    assert layer.num_tokens == 0 and layer.dtype is None
    keys, values = make_kv(batch=1, heads=2, tokens=12, seed=5)  # another batch size is fine: nothing was stored
    layer.append(keys.half(), values.half())
    assert layer.num_tokens == 12 and layer.dtype == torch.float16


@pytest.mark.parametrize("method", kvpack.method_names())
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive"])
def test_many_query_rows_take_sdpa_over_the_materialized_store_with_the_same_answer(method, mask_kind, monkeypatch):
    """Prefill-sized queries run SDPA over materialize(); it must agree with the packed path, masks included."""
    from kvpack import store as base

    config = kvpack.config_class(method)(group_size=8, residual_length=16)
    keys, values = make_kv(batch=2, heads=2, tokens=90, seed=6)
    layer = kvpack.make_layer(config)
    layer.append(keys[:, :, :50], values[:, :, :50])  # quantized history
    layer.append(keys[:, :, 50:], values[:, :, 50:])  # a 40-token chunk: flushes, so pending fp is read too
    query = torch.randn(2, 6, 40, 64, generator=torch.Generator().manual_seed(7))
    mask = None
    if mask_kind != "causal":
        allowed = torch.rand(2, 1, 40, 90, generator=torch.Generator().manual_seed(8)) > 0.3
        allowed[1, 0, 5] = False  # a row with nothing to attend to: zero on both paths
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    fast = layer.attend(query, attention_mask=mask)
    monkeypatch.setattr(base, "SDPA_MIN_QUERIES", 10**9)
    packed = layer.attend(query, attention_mask=mask)
    torch.testing.assert_close(fast, packed, atol=2e-5, rtol=1e-4)
    if mask is not None:
        assert torch.equal(fast[1, :, 5], torch.zeros_like(fast[1, :, 5]))


@pytest.mark.parametrize("method", kvpack.method_names())
def test_a_long_prompt_leaves_no_prompt_sized_fp_buffers(method):
    """After a 2048-token prompt the fp residual/window hold < 2 R + 16 slots, not 2048 (memory is the point)."""
    config = kvpack.config_class(method)(group_size=32, residual_length=128)
    keys, values = make_kv(batch=2, heads=3, tokens=2048 + 300, seed=9)
    layer = kvpack.make_layer(config)
    layer.append(keys[:, :, :2000], values[:, :, :2000])  # 2000 = 15 * 128 + 80: 80 keys stay in fp
    out = layer.attend(torch.randn(2, 6, 1, 64))  # the flush step still reads the flushed tokens in fp
    assert torch.isfinite(out).all()
    for buf in (layer.keys.fp, layer.values.fp):
        assert buf.data.shape[2] <= 2 * 128 + 16, buf.data.shape
    for t in range(2000, 2348):  # decode: in-place compaction, no regrowth past the bound
        layer.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        for buf in (layer.keys.fp, layer.values.fp):
            assert buf.data.shape[2] <= 2 * 128 + 16, (t, buf.data.shape)


@pytest.mark.parametrize("method", kvpack.method_names())
@pytest.mark.parametrize("rows", [1, 20])  # the packed path and the many-rows SDPA path
def test_integer_masks_are_refused(method, rows):
    layer = kvpack.make_layer(kvpack.config_class(method)(group_size=8, residual_length=16))
    keys, values = make_kv(tokens=40)
    layer.append(keys, values)
    query = torch.randn(2, 6, rows, 64)
    for dtype in (torch.int64, torch.uint8, torch.int32):
        with pytest.raises(TypeError, match="bool .* or an additive float mask"):
            layer.attend(query, attention_mask=torch.ones(2, 1, rows, 40, dtype=dtype))
    ones = torch.ones(2, 1, rows, 40)
    torch.testing.assert_close(
        layer.attend(query, attention_mask=ones.bool()), layer.attend(query, attention_mask=ones * 0)
    )


@pytest.mark.parametrize("method", kvpack.method_names())
def test_keys_and_values_on_other_devices_or_layouts_are_refused(method):
    layer = kvpack.make_layer(kvpack.config_class(method)(group_size=8, residual_length=16))
    keys, values = make_kv(tokens=4)
    with pytest.raises(ValueError, match="one device"):
        layer.append(keys, torch.empty(values.shape, device="meta"))
    with pytest.raises(TypeError, match="dense"):
        layer.append(keys.to_sparse(), values)
    assert layer.num_tokens == 0
    layer.append(keys, values)
    with pytest.raises(ValueError, match="on cpu as before"):
        layer.append(torch.empty(keys.shape, device="meta"), torch.empty(values.shape, device="meta"))
    assert layer.num_tokens == 4


@pytest.mark.parametrize("method", kvpack.method_names())
def test_housekeeping_on_an_empty_layer_is_a_no_op(method):
    layer = kvpack.make_layer(kvpack.config_class(method)())
    layer.crop(0)
    layer.select_batch(torch.tensor([0]))
    layer.repeat_batch(2)
    assert layer.num_tokens == 0 and layer.shape is None


def test_layer_idx_is_bounded():
    for bad in (-1, 2**31, 1.0, True):
        with pytest.raises(ValueError, match="layer_idx must be an integer"):
            kvpack.make_layer(kvpack.KIVIConfig(), layer_idx=bad)


@pytest.mark.parametrize("method", kvpack.method_names())
def test_public_shape_properties(method):
    layer = kvpack.make_layer(kvpack.config_class(method)(group_size=8, residual_length=16))
    assert layer.shape is layer.batch_size is layer.head_dim is layer.dtype is None
    layer.append(*make_kv(batch=2, heads=3, tokens=5))
    assert layer.shape == (2, 3, 64) and layer.batch_size == 2 and layer.head_dim == 64
    assert layer.dtype == torch.float32


# --- the one-call append of decode steps (kvpack.kernels.tokens) ---------------------------------------------
def _states(layer):
    tensors, metadata = layer.state_dict()
    return {name: t.clone() for name, t in tensors.items()}, metadata


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_the_one_call_append_stores_what_the_torch_path_stores(dtype, monkeypatch):
    from kvpack.kernels import native

    if native.available():
        pytest.skip(f"no fast kernels here: {native.available()}")
    keys, values = make_kv(batch=2, tokens=300, dtype=dtype)
    layers = {}
    calls = []
    real = tokens.append_tokens
    monkeypatch.setattr(tokens, "append_tokens", lambda *a: calls.append(1) or real(*a))
    for path in ("one call", "torch"):
        if path == "torch":
            monkeypatch.setattr(tokens, "append_tokens", lambda *a: None)
        layer = make_layer(KIVIConfig(residual_length=32))
        layer.append(keys[:, :, :100], values[:, :, :100])
        for t in range(100, 300):
            layer.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        layers[path] = _states(layer)
    assert len(calls) > 150  # most decode steps fit the free slots
    (want, want_meta), (got, got_meta) = layers["torch"], layers["one call"]
    assert want.keys() == got.keys() and want_meta == got_meta
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("side", ("keys", "values"))
def test_a_refused_one_call_append_changes_nothing_attention_reads(side):
    layer = make_layer(KIVIConfig(residual_length=32))
    keys, values = make_kv(batch=1, tokens=64)
    layer.append(keys[:, :, :63], values[:, :, :63])
    layer.append(keys[:, :, 63:], values[:, :, 63:])  # flushes a key block: a pending view is live
    assert layer.keys.pending is not None
    query = torch.randn(1, 6, 1, 64)
    before, out_before = _states(layer), layer.attend(query)
    bad = torch.randn(1, 3, 1, 64)
    bad[0, 1, 0, 5] = float("nan")
    new = {"keys": bad, "values": torch.randn(1, 3, 1, 64)}
    if side == "values":
        new = {"keys": torch.randn(1, 3, 1, 64), "values": bad}
    with pytest.raises(ValueError, match=f"{side} contain 1 NaN/Inf values; nothing was stored"):
        layer.append(new["keys"], new["values"])
    after = _states(layer)
    assert before[1] == after[1] and all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    assert torch.equal(layer.attend(query), out_before)
