"""The Triton decode kernels (``methods/<name>/triton.py``) against the reference.

On a machine with a CUDA GPU the layers live on it and the kernels run natively, reached through the ops'
CUDA dispatch; elsewhere they run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest), slowly, so the shapes are small. Without triton installed the module is skipped.

Rule: float32 stores within 2x the reference's own error of float64 attention over what the step reads (as
the CPU kernels); fp16/bf16 stores (products in that dtype on tensor cores) within 2x the error of the same
attention computed by torch in that dtype.
"""

from __future__ import annotations

import pytest
import torch

from kvpack import KIVIConfig, QJLConfig, TurboConfig, kernels
from kvpack.kernels import gpu

from kernel_helpers import (
    ATOL,
    DECODE_CONFIGS,
    DECODE_IDS,
    assert_close_to_exact,
    decode_layer,
    decode_sample,
    exact_attention,
)

pytest.importorskip("triton", reason="triton is not installed (pip install 'kvpack[gpu]'): Triton kernels untested")
from kvpack.kernels import triton_decode as driver  # noqa: E402 (imports triton)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_attend(layer, query, attention_mask=None):
    """``layer.attend`` through the Triton kernel: dispatched on CUDA, called directly on CPU tensors."""
    if CUDA:
        with kernels.use("auto"):
            assert layer.decode_op.gpu_or_none(*_args(layer, query, attention_mask)) is not None
            return layer.attend(query, attention_mask=attention_mask)
    batch, heads_q, t_q, dim = query.shape
    args = _args(layer, query, attention_mask)
    assert layer.decode_op.gpu_check(*args) is None
    return layer.decode_op.gpu(*args).reshape(batch, heads_q, t_q, dim).to(query.dtype)


def _args(layer, query, attention_mask):
    layer._check_query(query)
    mask = layer._sinks_last(layer._grouped_mask(attention_mask, query, layer.num_tokens))
    return layer._decode_args(layer._group_query(query), mask, query.shape[-1] ** -0.5)


def low_precision_attention(layer, query, mask, dtype):
    """The attention of :func:`exact_attention` computed by torch in ``dtype`` (scores and weights rounded)."""
    keys, values = (x.to(dtype) for x in layer.materialize())
    rep = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    scores = (query.to(dtype) @ keys.transpose(-1, -2)).float() * query.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1).nan_to_num(0.0).to(dtype) @ values).float()


def check(layer, query, mask=None, causal=None):
    want_mask = mask if mask is not None else causal
    with kernels.use("reference"):
        want = layer.attend(query, attention_mask=mask)
    got = triton_attend(layer, query, mask)
    exact = exact_attention(layer, query, want_mask, query.shape[-1] ** -0.5).double()
    if layer.dtype == torch.float32:
        assert_close_to_exact(got.float(), want.float(), exact)
    else:
        lowp = low_precision_attention(layer, query, want_mask, layer.dtype)
        assert_close_to_exact(got.float(), lowp, exact)


@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=DECODE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "f16", "bf16"))
@pytest.mark.parametrize("masked", (False, True), ids=("nomask", "padding"))
def test_triton_decode_matches_the_reference(config, dtype, masked):
    """Batch 2, GQA (9 query heads on 3 kv heads), packed rows, a pending flush, the residual and window in the
    model dtype, with and without a left-padding mask."""
    layer = decode_layer(config, batch=2, tokens=97, dtype=dtype, steps=2, device=DEVICE)
    query = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, layer.num_tokens, dtype=torch.bool, device=DEVICE)
        mask[1, ..., :7] = False
    check(layer, query, mask)


@pytest.mark.parametrize("config", DECODE_CONFIGS[::2], ids=DECODE_IDS[::2])
def test_triton_decode_several_queries_take_the_causal_tail(config):
    """3 queries per head (27 grouped rows, one block of 32), causal among themselves."""
    layer = decode_layer(config, batch=1, tokens=90, steps=4, device=DEVICE)
    total = layer.num_tokens
    query = torch.randn(1, 9, 3, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    causal = torch.ones(3, total, dtype=torch.bool, device=DEVICE).tril(total - 3)
    check(layer, query, causal=causal)


@pytest.mark.parametrize("config", DECODE_CONFIGS[::2], ids=DECODE_IDS[::2])
def test_triton_decode_splits_the_token_axis_and_merges(config, monkeypatch):
    """Many small splits (one tile each) merged by the second launch; batch row 1 masked over its first 300
    tokens, so whole splits hold nothing to attend."""
    monkeypatch.setattr(driver, "MIN_TILES", 1)
    monkeypatch.setattr(driver, "_programs", lambda device: 64)
    layer = decode_layer(config, batch=2, tokens=500, steps=1, device=DEVICE)
    assert driver.chunk_tokens(2 * 3, layer.num_tokens, config.group_size, 64) < layer.num_tokens // 4
    mask = torch.ones(2, 1, 1, layer.num_tokens, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :300] = False
    check(layer, torch.randn(2, 9, 1, 64).to(DEVICE), mask)


@pytest.mark.parametrize("dim", (128, 256))
@pytest.mark.parametrize("config", [KIVIConfig(residual_length=32), QJLConfig(residual_length=32), TurboConfig(residual_length=32)],
                         ids=("kivi", "qjl", "turbo"))  # fmt: skip
def test_triton_decode_large_head_dims(config, dim):
    layer = decode_layer(config, batch=1, tokens=70, steps=1, dim=dim, device=DEVICE)
    check(layer, torch.randn(1, 6, 1, dim).to(DEVICE))


def test_triton_decode_rows_with_nothing_to_attend_are_zero():
    layer = decode_layer(KIVIConfig(residual_length=32), batch=2, tokens=60, device=DEVICE)
    mask = torch.ones(2, 1, 1, layer.num_tokens, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    out = triton_attend(layer, torch.randn(2, 9, 1, 64).to(DEVICE), mask)
    assert bool((out[0] == 0).all()) and bool(torch.isfinite(out[1]).all())


def test_triton_reason_names_what_the_kernels_do_not_take(monkeypatch):
    """Well-formed arguments the tiles cannot cover go to the reference with a reason; the same structural
    check as the CPU kernels runs first (malformed input raises)."""
    kivi = kernels.registered()["kivi_decode"]
    assert "group_size 8" in kivi.gpu_check(*decode_sample(KIVIConfig(group_size=8, residual_length=16)))
    assert "head_dim 48" in kivi.gpu_check(*decode_sample(KIVIConfig(group_size=16, residual_length=16), dim=48))
    args = decode_sample(TurboConfig(group_size=16, residual_length=16))
    turbo = kernels.registered()["turbo_decode"]
    assert turbo.gpu_check(*args) is None
    with kernels.use("reference"):
        assert turbo.gpu_or_none(*args) is None
    with kernels.use("auto"):
        assert turbo.gpu_or_none(*args) is turbo.gpu
    monkeypatch.setattr(gpu, "interpreting", lambda: False)
    if not CUDA:
        assert "device cpu" in turbo.gpu_check(*args)
    bad = list(args)
    bad[2] = bad[2][:, :, :1]  # a key scale that does not match its codes
    with pytest.raises(ValueError, match="key codes"):
        turbo.gpu_or_none(*bad)


def test_triton_decode_follows_the_store_across_flushes_and_window_slides():
    """Decode steps across key flushes and window slides: Triton and the reference agree step by step (the
    layouts the stores write, storage slack included, are what the kernel reads)."""
    layer = decode_layer(TurboConfig(key_bits=4, residual_length=32), batch=1, tokens=20, steps=0, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    for step in range(40):
        layer.append(*(torch.randn(1, 3, 1, 64, generator=gen).to(DEVICE) for _ in range(2)))
        if step % 13 == 0 or layer.keys.pending is not None:
            query = torch.randn(1, 9, 1, 64, generator=gen).to(DEVICE)
            with kernels.use("reference"):
                want = layer.attend(query)
            torch.testing.assert_close(triton_attend(layer, query), want, rtol=1e-4, atol=ATOL)


# --- quantize and pack at flush --------------------------------------------------------------------------
QUANTIZE_CASES = [(bits, x_dtype, scale_dtype) for bits in (1, 2, 4, 8)
                  for x_dtype, scale_dtype in ((torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32), (torch.bfloat16, None))][::2]  # fmt: skip


@pytest.mark.parametrize("bits,x_dtype,scale_dtype", QUANTIZE_CASES)
@pytest.mark.parametrize("name", ("quantize_pack_tokens", "quantize_pack_key_groups"))
def test_triton_quantize_is_bit_for_bit_the_reference(name, bits, x_dtype, scale_dtype):
    """Codes, scales and zeros exactly as the reference writes them (atol = 0), on a strided view with a
    constant group and ties of the rounding among the inputs."""
    kernel = kernels.registered()[name]
    base = torch.randn(2, 3, 80, 64, generator=torch.Generator().manual_seed(bits)) * 4
    base[0, 0, :32, :32] = 1.5  # constant groups (scale 0) on both layouts
    base[1, 2, :32, :32] = torch.arange(32.0)  # codes landing on .5 before rounding
    x = base.to(DEVICE, x_dtype)[:, :, 8:72]  # a view: token stride 64, offset 8 tokens
    assert kernel.gpu_check(x, bits, 32, scale_dtype) is None
    got = kernel.gpu(x, bits, 32, scale_dtype)
    want = kernel.reference(x, bits, 32, scale_dtype)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("name", ("quantize_pack_tokens", "quantize_pack_key_groups"))
def test_triton_quantize_refuses_what_the_reference_refuses(name):
    """A NaN or a scale overflowing float16 is flagged by the kernel; the reference then raises its error."""
    kernel = kernels.registered()[name]
    x = torch.randn(1, 2, 32, 64).to(DEVICE)
    x[0, 1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="overflows"):
        kernel.gpu(x, 2, 32, torch.float16)
    with pytest.raises(ValueError, match="overflows"):
        kernel.gpu(torch.full((1, 2, 32, 64), 1e6, device=DEVICE).index_fill_(3, torch.tensor([0], device=DEVICE), -1e6),
                   2, 32, torch.float16)  # fmt: skip


def test_a_store_flushing_through_the_triton_quantizers_holds_what_the_cpu_kernels_write(monkeypatch):
    """A KIVI layer whose flushes run the Triton quantizers (on CPU tensors: routed there for the test) holds
    the same bytes as one flushed by the default kernels."""
    want = decode_layer(KIVIConfig(key_bits=4, residual_length=32), batch=2, tokens=150, steps=40).state_dict()[0]
    for name in ("quantize_pack_tokens", "quantize_pack_key_groups"):
        kernel = kernels.registered()[name]
        monkeypatch.setattr(kernel, "cpu", kernel.gpu if not CUDA else kernel.cpu)
    got = decode_layer(KIVIConfig(key_bits=4, residual_length=32), batch=2, tokens=150, steps=40,
                       device=DEVICE).state_dict()[0]  # fmt: skip
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name].cpu(), want[name]), name


def test_triton_decode_reads_the_sinks_as_a_third_fp_chunk():
    """With sinks the fp lists hold three chunks (the flushed block, the residual or window, the sinks) and the
    mask's columns follow them."""
    for config in (KIVIConfig(residual_length=32, sink_tokens=4), TurboConfig(residual_length=32, sink_tokens=4)):
        layer = decode_layer(config, batch=2, tokens=96, steps=1, device=DEVICE)
        lists = [a for a in _args(layer, torch.randn(2, 9, 1, 64).to(DEVICE), None) if isinstance(a, list)]
        assert [len(x) for x in lists] == [2, 3]  # keys: residual, sinks; values: flushed token, window, sinks
        mask = torch.ones(2, 1, 1, layer.num_tokens, dtype=torch.bool, device=DEVICE)
        mask[1, ..., :2] = False
        check(layer, torch.randn(2, 9, 1, 64).to(DEVICE), mask)
