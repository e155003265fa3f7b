"""Fast kernels against the pure-torch reference, and the dispatch point's backend rules.

Fused matmul kernels must be within 2x the reference's own error (both measured against a float64
computation of the same dequantized math) plus a small atol; quantize/pack kernels must match bit for bit.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from kvpack import KIVIConfig, QJLConfig, TurboConfig, kernels, make_layer
from kvpack.kernels import native
from kvpack.methods.turbo import _Codec, random_rotation
from kvpack.primitives import dequantize_affine, pack_bits, quantize_affine, unpack_bits

from kernel_helpers import (
    DECODE_CONFIGS,
    DECODE_IDS,
    assert_close_to_exact,
    decode_layer,
    decode_sample,
    dispatch,
    exact_attention,
    reference,
    to_meta,
)
from kernel_helpers import fast as cpu  # the fast CPU kernel of each op, forced

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(scope="module", autouse=True)
def fast_library():
    if native._compiler() is None:
        pytest.skip("no C++ compiler: the fast kernels cannot be built here")
    native.load()  # a build failure fails the tests


def strided(x: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """``x`` as a view into a longer buffer along axis 2, the way GrowBuffer hands out its tensors."""
    buf = torch.zeros(x.shape[:2] + (x.shape[2] + extra,) + x.shape[3:], dtype=x.dtype)
    buf[:, :, 1 : 1 + x.shape[2]] = x
    return buf[:, :, 1 : 1 + x.shape[2]]


def key_groups(batch, heads, n_groups, dim, group, bits, scale_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n_groups, dim, group, generator=gen)
    keys[..., :2, :] *= 8  # outlier channels, as in real keys
    codes, scale, zero = quantize_affine(keys, bits, group, -1, scale_dtype)
    return pack_bits(codes, bits, -1), scale.squeeze(-1), zero.squeeze(-1)


def token_values(batch, heads, tokens, dim, group, bits, scale_dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, heads, tokens, dim, generator=gen)
    codes, scale, zero = quantize_affine(values, bits, group, -1, scale_dtype)
    return pack_bits(codes, bits, -1), scale, zero


# (batch, kv heads, groups or tokens, head_dim, group size), easy to hard; tokens are odd on purpose.
SHAPES = [
    (1, 1, 1, 64, 32),
    (2, 3, 5, 64, 32),
    (1, 2, 7, 128, 64),
    (2, 1, 3, 64, 16),
    (1, 2, 4, 64, 8),
    (1, 3, 40, 128, 128),
]
ROWS = (1, 3, 4, 8, 13)  # GQA ratio x query tokens: 1, 3, 4, 8 at decode; 13 = prefill-like remainder


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
def test_kivi_key_scores_matches_reference(bits, shape, scale_dtype):
    batch, heads, n_groups, dim, group = shape
    codes, scale, zero = key_groups(batch, heads, n_groups, dim, group, bits, scale_dtype)
    codes, scale, zero = strided(codes), strided(scale), strided(zero)
    keys = unpack_bits(codes, bits, group).double() * scale.double().unsqueeze(-1) + zero.double().unsqueeze(-1)
    for rows in ROWS:
        query = torch.randn(batch, heads, rows, dim)
        exact = torch.einsum("bhmd,bhndg->bhmng", query.double(), keys).flatten(3)
        ref = reference.kivi_key_scores(query, codes, scale, zero, bits)
        fast = cpu.kivi_key_scores(query, codes, scale, zero, bits)
        assert_close_to_exact(fast, ref, exact)


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
def test_value_weighted_sum_matches_reference(bits, shape, scale_dtype):
    batch, heads, n_groups, dim, group = shape
    tokens = n_groups * 7 + 2  # odd
    codes, scale, zero = token_values(batch, heads, tokens, dim, group, bits, scale_dtype)
    codes, scale, zero = strided(codes), strided(scale), strided(zero)
    values = dequantize_affine(unpack_bits(codes, bits, dim), scale.double(), zero.double(), group, -1, torch.float64)
    for rows in ROWS:
        # attention weights over a longer cache, sliced to the quantized part (a strided view, as in base.py)
        weights = torch.softmax(torch.randn(batch, heads, rows, tokens + 5), dim=-1)[..., :tokens]
        exact = weights.double() @ values
        ref = reference.value_weighted_sum(weights, codes, scale, zero, bits, group)
        fast = cpu.value_weighted_sum(weights, codes, scale, zero, bits, group)
        assert_close_to_exact(fast, ref, exact)


@pytest.mark.parametrize("bits", (2, 4))
def test_parallel_paths_match_reference(bits):
    """Shapes large enough to split work across threads (key blocks; value token segments + reduction)."""
    codes, scale, zero = key_groups(1, 2, 70, 64, 32, bits, torch.float16)
    query = torch.randn(1, 2, 3, 64)
    keys = unpack_bits(codes, bits, 32).double() * scale.double().unsqueeze(-1) + zero.double().unsqueeze(-1)
    exact = torch.einsum("bhmd,bhndg->bhmng", query.double(), keys).flatten(3)
    assert_close_to_exact(
        cpu.kivi_key_scores(query, codes, scale, zero, bits),
        reference.kivi_key_scores(query, codes, scale, zero, bits),
        exact,
    )
    codes, scale, zero = token_values(1, 1, 3001, 64, 32, bits, torch.float16)
    weights = torch.softmax(torch.randn(1, 1, 3, 3001) * 3, dim=-1)
    values = dequantize_affine(unpack_bits(codes, bits, 64), scale.double(), zero.double(), 32, -1, torch.float64)
    assert_close_to_exact(
        cpu.value_weighted_sum(weights, codes, scale, zero, bits, 32),
        reference.value_weighted_sum(weights, codes, scale, zero, bits, 32),
        weights.double() @ values,
    )


def test_empty_inputs():
    codes, scale, zero = key_groups(1, 2, 1, 64, 32, 2, torch.float16)
    empty = cpu.kivi_key_scores(torch.randn(1, 2, 3, 64), codes[:, :, :0], scale[:, :, :0], zero[:, :, :0], 2)
    assert empty.shape == (1, 2, 3, 0)
    codes, scale, zero = token_values(1, 2, 4, 64, 32, 2, torch.float16)
    out = cpu.value_weighted_sum(torch.ones(1, 2, 3, 0), codes[:, :, :0], scale[:, :, :0], zero[:, :, :0], 2, 32)
    assert torch.equal(out, torch.zeros(1, 2, 3, 64))


QJL_CONFIGS = [
    QJLConfig(),
    QJLConfig(outlier_channels=0),
    QJLConfig(sketch_dim=72, outlier_sketch_dim=40, outlier_channels=3, scale_dtype="bfloat16"),
    QJLConfig(sketch_dim=128, outlier_sketch_dim=128, scale_dtype="float32", group_size=16, residual_length=32),
]


def qjl_exact(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
    """The QJL estimator of kvpack.methods.qjl.reference.qjl_key_scores, in float64."""
    q, s = query.double(), sketch.double()
    m = sketch.shape[0]
    m_o, dim = outlier_signs.shape[-1] * 8, query.shape[-1]
    is_out = torch.zeros(outlier_idx.shape[:3] + (dim,), dtype=torch.float64)
    is_out.scatter_(-1, outlier_idx.long(), 1.0)  # (B, H, N, D)
    q_out = q.unsqueeze(3) * is_out.unsqueeze(2)  # (B, H, M, N, D)
    sq_out = q_out @ s.T  # (B, H, M, N, m)
    sq_in = (q @ s.T).unsqueeze(3) - sq_out
    sign = unpack_bits(signs, 1, m).double() * 2 - 1  # (B, H, N, G, m)
    scores = torch.einsum("bhmnp,bhngp->bhmng", sq_in, sign) * (torch.pi / 2) ** 0.5 / m * norms.double().unsqueeze(2)
    if outlier_idx.shape[-1] and m_o:
        sign_o = unpack_bits(outlier_signs, 1, m_o).double() * 2 - 1
        dot = torch.einsum("bhmnp,bhngp->bhmng", sq_out[..., :m_o], sign_o)
        scores = scores + dot * (torch.pi / 2) ** 0.5 / m_o * outlier_norms.double().unsqueeze(2)
    return scores.flatten(3)


@pytest.mark.parametrize("config", QJL_CONFIGS, ids=("default", "no-outliers", "m72-bf16", "m128-g16-f32"))
@pytest.mark.parametrize("dim", (64, 128))
def test_qjl_key_scores_matches_reference(config, dim):
    from kvpack.methods.qjl import QJLKeyFormat

    store = QJLKeyFormat(config, layer_idx=1)
    store.build(dim)
    keys = torch.randn(2, 3, 5 * config.group_size, dim)
    keys[..., :3] *= 6  # outlier channels
    groups = store.quantize(keys)
    groups = {name: strided(t) for name, t in groups.items()}
    for rows in ROWS:
        query = torch.randn(2, 3, rows, dim)
        args = (query, store.sketch, groups["outlier_idx"], groups["signs"], groups["norms"],
                groups["outlier_signs"], store._outlier_norms(groups))  # fmt: skip
        assert_close_to_exact(cpu.qjl_key_scores(*args), reference.qjl_key_scores(*args), qjl_exact(*args))


# --- turbo (rotated codebook) -----------------------------------------------------------------------------
@functools.cache
def turbo_codec(bits, dim, scale_dtype):
    return _Codec(bits, random_rotation(dim, seed=2, layer_idx=0), scale_dtype)


def turbo_tokens(batch, heads, tokens, dim, bits, scale_dtype, seed=2):
    """Codes, scales and codebook of random tokens encoded as TurboLayer stores them, as strided views."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, tokens, dim, generator=gen)
    x = x * (0.5 + torch.rand(batch, heads, tokens, 1, generator=gen))  # token norms vary
    x[..., :2] *= 4  # outlier channels (the rotation spreads them)
    codec = turbo_codec(bits, dim, scale_dtype)
    codes, scale = codec.encode(x)
    return strided(codes), strided(scale), codec.codebook


def turbo_exact(codes, scale, codebook, bits):
    """The rotated reconstructions ``scale_t * codebook[code_{t,d}]`` in float64, (B, H, T, D)."""
    return codebook.double()[unpack_bits(codes, bits).long()] * scale.double().unsqueeze(-1)


# (batch, kv heads, tokens, head_dim), easy to hard; token counts are odd on purpose. head_dim 40 packs into
# 5 or 10 bytes at 1 or 2 bits: the kernels' paths for rows that are not whole 8-byte vectors.
TURBO_SHAPES = [(1, 1, 1, 64), (2, 3, 37, 64), (1, 2, 129, 128), (2, 2, 19, 40), (1, 3, 701, 128)]


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
@pytest.mark.parametrize("shape", TURBO_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
def test_turbo_kernels_match_reference(bits, shape, scale_dtype):
    batch, heads, tokens, dim = shape
    if dim * bits % 8:
        pytest.skip("codes must fill whole bytes")
    codes, scale, codebook = turbo_tokens(batch, heads, tokens, dim, bits, scale_dtype)
    exact_values = turbo_exact(codes, scale, codebook, bits)  # (B, H, T, D)
    for rows in ROWS:
        query = torch.randn(batch, heads, rows + 2, dim)[:, :, 1:-1]  # a strided view of rotated queries
        exact = query.double() @ exact_values.transpose(-1, -2)
        ref = reference.turbo_key_scores(query, codes, scale, codebook, bits)
        fast = cpu.turbo_key_scores(query, codes, scale, codebook, bits)
        assert_close_to_exact(fast, ref, exact)
        weights = torch.softmax(torch.randn(batch, heads, rows, tokens + 5), dim=-1)[..., :tokens]
        exact = weights.double() @ exact_values
        ref = reference.turbo_weighted_sum(weights, codes, scale, codebook, bits)
        fast = cpu.turbo_weighted_sum(weights, codes, scale, codebook, bits)
        assert_close_to_exact(fast, ref, exact)


@pytest.mark.parametrize("bits", (2, 4))
def test_turbo_parallel_paths_match_reference(bits):
    """Token segments: the key kernel splits long caches across threads, the value kernel also reduces."""
    codes, scale, codebook = turbo_tokens(1, 1, 5001, 64, bits, torch.float16)
    exact_values = turbo_exact(codes, scale, codebook, bits)
    query = torch.randn(1, 1, 3, 64)
    weights = torch.softmax(torch.randn(1, 1, 3, 5001) * 3, dim=-1)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # segments are only made for more than one thread
    try:
        fast_scores = cpu.turbo_key_scores(query, codes, scale, codebook, bits)
        fast_sum = cpu.turbo_weighted_sum(weights, codes, scale, codebook, bits)
    finally:
        torch.set_num_threads(threads)
    ref = reference.turbo_key_scores(query, codes, scale, codebook, bits)
    assert_close_to_exact(fast_scores, ref, query.double() @ exact_values.transpose(-1, -2))
    ref = reference.turbo_weighted_sum(weights, codes, scale, codebook, bits)
    assert_close_to_exact(fast_sum, ref, weights.double() @ exact_values)


def test_turbo_empty_and_mismatched_inputs():
    codes, scale, codebook = turbo_tokens(1, 2, 4, 64, 2, torch.float16)
    scores = cpu.turbo_key_scores(torch.randn(1, 2, 3, 64), codes[:, :, :0], scale[:, :, :0], codebook, 2)
    assert scores.shape == (1, 2, 3, 0)
    out = cpu.turbo_weighted_sum(torch.ones(1, 2, 3, 0), codes[:, :, :0], scale[:, :, :0], codebook, 2)
    assert torch.equal(out, torch.zeros(1, 2, 3, 64))
    with pytest.raises(ValueError, match="do not match"):  # the kernel would read past the 4 tokens
        cpu.turbo_weighted_sum(torch.ones(1, 2, 3, 5), codes, scale, codebook, 2)
    with pytest.raises(ValueError, match="do not match"):
        cpu.turbo_key_scores(torch.randn(1, 2, 3, 64), codes, scale[:, :, :3], codebook, 2)


def test_turbo_unsupported_input_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.delenv("KVPACK_KERNELS", raising=False)
    codes, scale, codebook = turbo_tokens(1, 2, 9, 64, 2, torch.float32)
    scale = scale.double()  # no fast kernel for float64 scales
    query = torch.randn(1, 2, 3, 64)
    with caplog.at_level(logging.WARNING, logger="kvpack.kernels"):
        first = dispatch.turbo_key_scores(query, codes, scale, codebook, 2)
        second = dispatch.turbo_key_scores(query, codes, scale, codebook, 2)
    warnings = [r for r in caplog.records if r.name == "kvpack.kernels"]
    assert len(warnings) == 1 and "float64" in warnings[0].getMessage()
    assert torch.equal(first, reference.turbo_key_scores(query, codes, scale, codebook, 2))
    assert torch.equal(first, second)
    weights = torch.softmax(torch.randn(1, 2, 3, 9), -1)
    with kernels.use("fast"), pytest.raises(kernels.KernelUnavailableError, match="float64"):
        dispatch.turbo_weighted_sum(weights, codes, scale, codebook, 2)


# --- quantize and pack (flush): bit for bit ------------------------------------------------------------
def assert_identical(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.dtype != torch.uint8:
            g, w = g.view(torch.uint8), w.view(torch.uint8)  # compare the stored bits
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", (None, *SCALE_DTYPES), ids=str)
@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_quantize_pack_is_bit_exact(dtype, scale_dtype, bits):
    gen = torch.Generator().manual_seed(bits)
    for group in (8, 32, 64):
        x = torch.randn(2, 3, 3 * group + 1, 64, generator=gen) * torch.rand(64, generator=gen) * 4
        x = x + torch.randn(64, generator=gen)  # channel offsets
        x[0, 0, 5] = 1.5  # a constant token (zero scale)
        x[0, 1, 1 : 1 + group, 7] = -0.25  # a constant key group channel
        x = x.to(dtype)[:, :, 1:]  # a strided view, as the residual hands it over
        assert_identical(cpu.quantize_pack_tokens(x, bits, group, scale_dtype),
                         reference.quantize_pack_tokens(x, bits, group, scale_dtype))  # fmt: skip
        assert_identical(cpu.quantize_pack_key_groups(x, bits, group, scale_dtype),
                         reference.quantize_pack_key_groups(x, bits, group, scale_dtype))  # fmt: skip


def test_quantize_pack_raises_as_the_reference():
    big = torch.full((1, 1, 32, 64), 1e5)
    big[..., 0, :] = -1e5  # range 2e5: the scale overflows float16
    for fn in (cpu.quantize_pack_tokens, cpu.quantize_pack_key_groups):
        with pytest.raises(ValueError, match="overflows"):
            fn(big.transpose(2, 3).contiguous() if fn is cpu.quantize_pack_tokens else big, 2, 32, torch.float16)
    nan = torch.randn(1, 1, 32, 64)
    nan[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError):
        cpu.quantize_pack_tokens(nan, 2, 32, torch.float16)
    with pytest.raises(ValueError, match="multiple of group_size"):
        cpu.quantize_pack_key_groups(torch.randn(1, 1, 33, 64), 2, 32)


@pytest.mark.parametrize("m", (8, 64, 72, 256, 13))
def test_pack_signs_is_bit_exact(m):
    x = torch.randn(2, 3, 5, 7, m)
    x[0, 0, 0, 0, :4] = torch.tensor([0.0, -0.0, float("nan"), 1e-30])[: min(4, m)]
    assert torch.equal(cpu.pack_signs(x), reference.pack_signs(x))
    view = x[:, :, 1:]  # not contiguous
    assert torch.equal(cpu.pack_signs(view), reference.pack_signs(view))


def test_kivi_layer_state_is_identical_with_fast_flush():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 200, 64, generator=gen), torch.randn(2, 3, 200, 64, generator=gen)
    states = {}
    for backend in ("reference", "fast"):
        with kernels.use(backend):
            layer = make_layer(KIVIConfig(residual_length=64))
            layer.append(keys[:, :, :150], values[:, :, :150])
            for t in range(150, 200):
                layer.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
            states[backend] = layer.state_dict()[0]  # every stored tensor: codes, scales, zeros, fp residual
    want, got = states["reference"], states["fast"]
    assert want.keys() == got.keys() and {"keys.groups.codes", "values.tokens.codes"} <= set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --- layer level ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        KIVIConfig(residual_length=64),
        KIVIConfig(key_bits=4, value_bits=4, residual_length=32),
        KIVIConfig(key_bits=8, value_bits=2, group_size=16, residual_length=32),
    ],
    ids=("kivi2", "kivi4", "kivi8-2-g16"),
)
@pytest.mark.parametrize("q_heads", (3, 9))
def test_kivi_layer_attend_fast_matches_reference(config, q_heads):
    check_attend_fast_matches_reference(config, q_heads)


@pytest.mark.parametrize(
    "config",
    [
        TurboConfig(residual_length=64),
        TurboConfig(key_bits=4, value_bits=1, scale_dtype="bfloat16", residual_length=32),
        TurboConfig(key_bits=1, value_bits=8, scale_dtype="float32", group_size=16, residual_length=32),
    ],
    ids=("turbo2", "turbo4-1-bf16", "turbo1-8-g16-f32"),
)
@pytest.mark.parametrize("q_heads", (3, 9))
def test_turbo_layer_attend_fast_matches_reference(config, q_heads):
    check_attend_fast_matches_reference(config, q_heads)


@pytest.mark.parametrize("outlier_channels", (8, 0))
def test_qjl_layer_attend_fast_matches_reference(outlier_channels):
    config = QJLConfig(outlier_channels=outlier_channels, residual_length=64)
    check_attend_fast_matches_reference(config, q_heads=9, batch=1, check_every=30)  # the QJL reference is slow


def check_attend_fast_matches_reference(config, q_heads, batch=2, check_every=11):
    """Prefill, then decode steps through at least one key flush; fast and reference attend agree."""
    gen = torch.Generator().manual_seed(0)
    layer = make_layer(config)
    keys, values = torch.randn(batch, 3, 150, 64, generator=gen), torch.randn(batch, 3, 150, 64, generator=gen)
    layer.append(keys, values)  # prefill: 150 tokens, some flushed
    flushes = 0
    for step in range(config.residual_length + 3):  # decode steps, through at least one key flush
        layer.append(torch.randn(batch, 3, 1, 64, generator=gen), torch.randn(batch, 3, 1, 64, generator=gen))
        if step % check_every and layer.keys.pending is None:  # check every few steps and every key flush
            continue
        flushes += layer.keys.pending is not None
        query = torch.randn(batch, q_heads, 1, 64, generator=gen)
        with kernels.use("reference"):
            want = layer.attend(query)
        with kernels.use("fast"):
            got = layer.attend(query)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert flushes >= 1


# --- the fused decode step (one C++ call per layer: kernels/csrc/decode.h) --------------------------------
@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=DECODE_IDS)
@pytest.mark.parametrize("store_dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
@pytest.mark.parametrize("queries", (1, 3))
@pytest.mark.parametrize("masked", (False, True), ids=("nomask", "padding"))
def test_decode_step_matches_the_reference(config, store_dtype, queries, masked):
    """Batched, GQA (9 query heads), with and without a padding mask, one or several queries (causal tail):
    the fused step within 2x the reference's error versus float64; packed rows, a pending flush and fp
    tokens of the model dtype all read."""
    layer = decode_layer(config, batch=2, tokens=100 - queries, dtype=store_dtype, steps=queries + 1)
    total = layer.num_tokens
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, 9, queries, 64, generator=gen)
    mask = None
    if masked:  # row 1 is left-padded by 7 tokens; the queries are causal among themselves
        mask = torch.ones(2, 1, queries, total, dtype=torch.bool).tril(total - queries)
        mask[1, ..., :7] = False
    causal = torch.ones(queries, total, dtype=torch.bool).tril(total - queries)
    with kernels.use("reference"):
        want = layer.attend(query, attention_mask=mask)
    with kernels.use("fast"):
        got = layer.attend(query, attention_mask=mask)
    exact = exact_attention(layer, query, mask if masked else (causal if queries > 1 else None), 64**-0.5)
    assert_close_to_exact(got, want, exact.double())


@pytest.mark.parametrize("config", DECODE_CONFIGS[::2], ids=DECODE_IDS[::2])
def test_decode_step_token_segments_and_threads_match_the_reference(config):
    """Batch 1 over 3000 tokens with 2 threads: the token axis is split into segments whose softmax maxima
    are merged (flash-decoding); the result is within 2x the reference's error, as with one thread."""
    layer = decode_layer(config, batch=1, tokens=3000)
    query = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(2))
    with kernels.use("reference"):
        want = layer.attend(query)
    exact = exact_attention(layer, query, None, 64**-0.5).double()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with kernels.use("fast"):
                assert_close_to_exact(layer.attend(query), want, exact)
    finally:
        torch.set_num_threads(threads)


def test_decode_step_rows_with_nothing_to_attend_to_are_zero_and_poisoned_rows_nan():
    layer = decode_layer(KIVIConfig(residual_length=32), batch=2, tokens=60)
    query = torch.randn(2, 9, 1, 64)
    mask = torch.ones(2, 1, 1, layer.num_tokens, dtype=torch.bool)
    mask[0] = False  # batch row 0 attends to nothing
    with kernels.use("fast"):
        out = layer.attend(query, attention_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out[1]).all()
    layer.keys.fp.view()[1, 0, -1] = float("inf")  # a forged key: q.k overflows for batch 1, head 0
    for backend in ("fast", "reference"):
        with kernels.use(backend):
            out = layer.attend(query)
        assert out[1, :3].isnan().all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 3:]).all()


def decode_op_cases():
    """(name, mutate(args) -> args, error type or None for a reason to run the reference) for kivi_decode."""

    def at(i, value):
        return lambda a: [*a[:i], value(a[i]) if callable(value) else value, *a[i + 1 :]]

    return [
        ("key rows past capacity", at(4, lambda n: 10**6), ValueError),
        ("negative value rows", at(9, -1), ValueError),
        ("float row count", at(4, lambda n: float(n)), ValueError),
        ("mask of another shape", at(11, lambda m: m[..., :-1]), ValueError),
        ("bool mask", at(11, lambda m: m == 0), TypeError),
        ("three fp chunks", at(5, lambda fp: [*fp, fp[-1], fp[-1]]), TypeError),
        ("fp chunk of another head_dim", at(10, lambda fp: [x[..., :32] for x in fp]), ValueError),
        ("fp chunks of two dtypes", at(10, lambda fp: [fp[0], fp[1].half()] if len(fp) == 2 else [fp[0].half()]),
         (TypeError, ValueError)),
        ("a token count that disagrees", at(10, lambda fp: fp[:-1]), ValueError),
        ("key codes of another head count", at(1, lambda c: c[:, :1]), ValueError),
        ("value scale of another dtype", at(7, lambda s: s.float()), None),
        ("float64 query", at(0, lambda q: q.double()), None),
    ]  # fmt: skip


@pytest.mark.parametrize("case", decode_op_cases(), ids=lambda c: c[0])
def test_decode_op_refuses_malformed_input_before_the_cpp(case):
    _, mutate, error = case
    args = mutate(list(decode_sample(KIVIConfig(group_size=8, residual_length=16))))
    if error is not None:
        for backend in ("fast", "auto", "reference"):
            with kernels.use(backend), pytest.raises(error):
                dispatch.kivi_decode(*args)
        return
    with kernels.use("fast"), pytest.raises(kernels.KernelUnavailableError, match="kivi_decode"):
        dispatch.kivi_decode(*args)
    with kernels.use("reference"):
        want = dispatch.kivi_decode(*args)
    torch.testing.assert_close(dispatch.kivi_decode(*args), want)  # auto: the reference composition


# --- dispatch -------------------------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    monkeypatch.delenv("KVPACK_KERNELS", raising=False)
    assert kernels.backend() == "auto"
    monkeypatch.setenv("KVPACK_KERNELS", "reference")
    assert kernels.backend() == "reference"
    with kernels.use("fast"):
        assert kernels.backend() == "fast"
        with kernels.use("reference"):
            assert kernels.backend() == "reference"
        assert kernels.backend() == "fast"
    monkeypatch.setenv("KVPACK_KERNELS", "turbo")
    with pytest.raises(ValueError, match="KVPACK_KERNELS must be one of"):
        kernels.backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        with kernels.use("turbo"):
            pass


def test_reference_backend_never_calls_fast(monkeypatch):
    def boom(*args):
        raise AssertionError("fast kernel called")

    monkeypatch.setattr(kernels.registered()["kivi_key_scores"], "cpu", boom)  # what the CPU op calls
    codes, scale, zero = key_groups(1, 1, 2, 64, 32, 2, torch.float16)
    query = torch.randn(1, 1, 3, 64)
    with kernels.use("reference"):
        dispatch.kivi_key_scores(query, codes, scale, zero, 2)
    with pytest.raises(AssertionError, match="fast kernel called"):
        dispatch.kivi_key_scores(query, codes, scale, zero, 2)  # auto picks the fast kernel when it can


def test_unsupported_input_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.delenv("KVPACK_KERNELS", raising=False)
    codes, scale, zero = token_values(1, 2, 9, 64, 32, 2, torch.float32)
    scale, zero = scale.double(), zero.double()  # no fast kernel for float64 scales
    weights = torch.softmax(torch.randn(1, 2, 3, 9), -1)
    with caplog.at_level(logging.WARNING, logger="kvpack.kernels"):
        first = dispatch.value_weighted_sum(weights, codes, scale, zero, 2, 32)
        second = dispatch.value_weighted_sum(weights, codes, scale, zero, 2, 32)
    warnings = [r for r in caplog.records if r.name == "kvpack.kernels"]
    assert len(warnings) == 1 and "float64" in warnings[0].getMessage()
    assert torch.equal(first, reference.value_weighted_sum(weights, codes, scale, zero, 2, 32))
    assert torch.equal(first, second)
    with kernels.use("fast"), pytest.raises(kernels.KernelUnavailableError, match="float64"):
        dispatch.value_weighted_sum(weights, codes, scale, zero, 2, 32)


def test_missing_library_falls_back_once_or_raises_when_forced(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(native, "available", lambda: "no C++ compiler found (install g++ or set CXX)")
    monkeypatch.setenv("KVPACK_KERNELS", "auto")
    codes, scale, zero = key_groups(1, 1, 2, 64, 32, 2, torch.float16)
    query = torch.randn(1, 1, 3, 64)
    with caplog.at_level(logging.WARNING, logger="kvpack.kernels"):
        for _ in range(3):
            out = dispatch.kivi_key_scores(query, codes, scale, zero, 2)
    assert len([r for r in caplog.records if "no C++ compiler" in r.getMessage()]) == 1
    assert torch.equal(out, reference.kivi_key_scores(query, codes, scale, zero, 2))
    with pytest.raises(kernels.KernelUnavailableError, match="no C\\+\\+ compiler"):
        with kernels.use("fast"):
            pass
    monkeypatch.setenv("KVPACK_KERNELS", "fast")
    with pytest.raises(kernels.KernelUnavailableError, match="no C\\+\\+ compiler"):
        dispatch.kivi_key_scores(query, codes, scale, zero, 2)


@pytest.mark.build
def test_failed_build_is_reported(monkeypatch, tmp_path):
    """A compiler that fails makes the backend unavailable with the compiler's message (not a crash)."""
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("KVPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    reason = native.available()
    assert reason is not None and "broken compiler" in reason


def test_library_shares_torchs_openmp_runtime():
    """One libgomp in the process: the kernels use torch's thread pool rather than a second one."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        pytest.skip("no /proc/self/maps")
    gomp = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    assert len(gomp) <= 1, gomp


# --- inside generate ------------------------------------------------------------------------------------
def generate_with(model, input_ids, config, backend, new_tokens):
    from kvpack.hf import make_cache

    with kernels.use(backend):
        return model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), cache=make_cache(model, config),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip


def assert_same_generation(got, want, near_tie):
    """Same tokens up to the first step where the reference's two best logits are within ``near_tie``."""
    logits = torch.stack(want.logits, dim=1)  # (B, steps, vocab)
    top2 = logits.topk(2, dim=-1).values
    ties = ((top2[..., 0] - top2[..., 1]) < near_tie).any(dim=0).nonzero()
    steps = int(ties[0]) if len(ties) else logits.shape[1]
    assert steps >= logits.shape[1] // 2, "too many near ties to compare"
    prompt = want.sequences.shape[1] - logits.shape[1]
    assert torch.equal(got.sequences[:, : prompt + steps], want.sequences[:, : prompt + steps])
    torch.testing.assert_close(torch.stack(got.logits, 1)[:, :steps], logits[:, :steps], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "config",
    [
        KIVIConfig(group_size=16, residual_length=16),
        QJLConfig(group_size=16, residual_length=16, outlier_channels=2),
        TurboConfig(group_size=16, residual_length=16),
    ],
    ids=("kivi2", "qjl", "turbo2"),
)
def test_fused_generate_same_tokens_with_fast_and_reference_kernels(tiny_llama, config):
    from kvpack.hf import enable

    enable(tiny_llama)
    input_ids = torch.randint(2, 128, (2, 37), generator=torch.Generator().manual_seed(0))
    want = generate_with(tiny_llama, input_ids, config, "reference", 12)  # 49 tokens: 3 key flushes of 16
    got = generate_with(tiny_llama, input_ids, config, "fast", 12)
    assert_same_generation(got, want, near_tie=1e-4)


@pytest.mark.model
def test_fused_generate_same_tokens_on_the_embedded_model(embedded_model):
    from kvpack.hf import enable

    model, tokenizer = embedded_model
    enable(model)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune " * 12
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :140]
    config = KIVIConfig(residual_length=64)  # 140 prompt tokens: 128 quantized keys, the rest in fp
    want = generate_with(model, input_ids, config, "reference", 8)
    got = generate_with(model, input_ids, config, "fast", 8)
    assert_same_generation(got, want, near_tie=1e-3)


# --- the ops themselves ------------------------------------------------------------------------------------
def op_samples():
    """name -> valid arguments, one small case per registered kernel."""
    from kvpack.methods.qjl import QJLKeyFormat

    codes, scale, zero = key_groups(1, 2, 3, 64, 32, 2, torch.float16)
    vcodes, vscale, vzero = token_values(1, 2, 9, 64, 32, 4, torch.float16)
    tcodes, tscale, codebook = turbo_tokens(1, 2, 9, 64, 2, torch.float16)
    qjl = QJLKeyFormat(QJLConfig(group_size=8, residual_length=16, sketch_dim=32, outlier_sketch_dim=16), 0)
    qjl.build(64)
    groups = qjl.quantize(torch.randn(1, 2, 16, 64))
    x = torch.randn(1, 2, 32, 64)
    return {
        "kivi_key_scores": (torch.randn(1, 2, 3, 64), codes, scale, zero, 2),
        "value_weighted_sum": (torch.rand(1, 2, 3, 9), vcodes, vscale, vzero, 4, 32),
        "quantize_pack_tokens": (x, 2, 32, torch.float16),
        "quantize_pack_key_groups": (x, 4, 16, None),
        "qjl_key_scores": (
            torch.randn(1, 2, 3, 64),
            qjl.sketch,
            groups["outlier_idx"],
            groups["signs"],
            groups["norms"],
            groups["outlier_signs"],
            groups["outlier_norms"],
        ),  # fmt: skip
        "pack_signs": (torch.randn(2, 3, 40),),
        "turbo_key_scores": (torch.randn(1, 2, 3, 64), tcodes, tscale, codebook, 2),
        "turbo_weighted_sum": (torch.rand(1, 2, 3, 9), tcodes, tscale, codebook, 2),
        "kivi_decode": decode_sample(KIVIConfig(group_size=8, residual_length=16)),
        "qjl_decode": decode_sample(QJLConfig(group_size=8, residual_length=16, sketch_dim=32, outlier_sketch_dim=16)),
        "turbo_decode": decode_sample(TurboConfig(group_size=8, residual_length=16)),
    }


def test_every_registered_kernel_has_a_sample():
    assert set(op_samples()) == set(kernels.registered())


@pytest.mark.parametrize("name", sorted(kernels.registered()))
def test_ops_pass_opcheck_and_their_fakes_give_the_real_shapes(name):
    """torch.library.opcheck (schema, fake tensor, dispatch registrations) on every op, and the fake's
    shapes and dtypes equal the real outputs' on the CPU and on meta tensors."""
    kernel, args = kernels.registered()[name], op_samples()[name]
    torch.library.opcheck(kernel.op, args)
    real = kernel(*args)
    meta = kernel(*[to_meta(a) for a in args])
    for got, want in zip(meta if isinstance(meta, tuple) else (meta,), real if isinstance(real, tuple) else (real,)):
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
