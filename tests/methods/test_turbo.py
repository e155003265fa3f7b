import math

import pytest
import torch
import torch.nn.functional as F

import kvpack
from kvpack.methods import turbo as turbo_module
from kvpack.methods.turbo import _Codec, gaussian_codebook, random_rotation


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codebook_is_lloyd_max_for_the_standard_normal(bits):
    centroids = gaussian_codebook(bits)
    assert len(centroids) == 2**bits
    assert all(a < b for a, b in zip(centroids, centroids[1:]))
    assert all(math.isclose(a, -b, abs_tol=1e-9) for a, b in zip(centroids, reversed(centroids)))
    # optimality conditions on samples: each centroid is the mean of its (midpoint) cell
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor(centroids, dtype=torch.float64)
    cells = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
    means = torch.zeros_like(c).index_add_(0, cells, x) / torch.bincount(cells, minlength=len(c))
    torch.testing.assert_close(means, c, atol=5e-3, rtol=0)
    if bits == 1:
        assert math.isclose(centroids[1], math.sqrt(2 / math.pi), rel_tol=1e-9)


def test_rotation_is_orthogonal_and_reproducible():
    rotation = random_rotation(64, seed=3, layer_idx=5)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(64), atol=1e-5, rtol=0)
    assert torch.equal(rotation, random_rotation(64, seed=3, layer_idx=5))
    assert not torch.equal(rotation, random_rotation(64, seed=3, layer_idx=6))


@pytest.mark.parametrize("bits,expected_mse", [(2, 0.1175), (4, 0.0095)])
def test_codec_error_matches_gaussian_theory_even_with_outlier_channels(bits, expected_mse):
    """After rotation, relative MSE is the codebook's Gaussian distortion, outlier channels or not."""
    generator = torch.Generator().manual_seed(1)
    codec = _Codec(bits, random_rotation(64, 0, 0), torch.float32)
    x = torch.randn(4000, 64, generator=generator)
    x[:, :3] *= 20.0  # channels that min-max quantization would spend its range on
    codes, scale = codec.encode(x)
    x_hat = codec.decode(codes, scale)
    relative_mse = ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()
    # the least-squares scale can only lower the error below the plain-codebook distortion
    assert relative_mse < expected_mse * 1.05
    assert relative_mse > expected_mse * 0.5
    # least squares: the residual is orthogonal to the reconstruction
    cos = ((x - x_hat) * x_hat).sum(-1) / (x_hat.norm(dim=-1) * x.norm(dim=-1))
    assert cos.abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_reads_codes_and_matches_the_dequantized_state(dtype):
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 3, 400, 64, generator=generator).to(dtype)
    values = torch.randn(2, 3, 400, 64, generator=generator).to(dtype)
    layer = kvpack.make_layer(kvpack.TurboConfig(key_bits=2, value_bits=4, residual_length=64), layer_idx=1)
    layer.append(keys[:, :, :399], values[:, :, :399])
    layer.append(keys[:, :, 399:], values[:, :, 399:])
    query = torch.randn(2, 9, 1, 64).to(dtype)
    k_hat, v_hat = layer.materialize()
    expected = F.scaled_dot_product_attention(
        query.float(), k_hat.float().repeat_interleave(3, 1), v_hat.float().repeat_interleave(3, 1)
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer.attend(query).float(), expected, atol=tol, rtol=tol)
    keys_fp32 = layer.keys.materialize()  # before the cast to the layer dtype
    torch.testing.assert_close(
        layer.scores(query),
        query.float() @ keys_fp32.repeat_interleave(3, 1).transpose(-1, -2),
        atol=1e-4,
        rtol=1e-4,
    )
    # the residual rules are KIVI's: the last R values and the T mod R newest keys are exact
    stored_keys, stored_values = layer.dequantize()
    assert torch.equal(stored_values[:, :, -64:].to(dtype), values[:, :, -64:])
    assert torch.equal(stored_keys[:, :, 384:].to(dtype), keys[:, :, 384:])


def test_bits_per_element_and_validation():
    layer = kvpack.make_layer(kvpack.TurboConfig(key_bits=2, value_bits=2, residual_length=32))
    keys = torch.randn(1, 3, 32 * 40 + 32, 64)
    layer.append(keys, keys)
    # 1312 = 41 * R keys all flush; values keep the last R = 32 in fp32. Per quantized token: 64 2-bit
    # codes (16 bytes) + a float16 scale (2 bytes).
    quantized_keys, quantized_values = 32 * 41, 32 * 40
    expected = 3 * (quantized_keys * (16 + 2) + quantized_values * (16 + 2) + 32 * 64 * 4)
    assert layer.nbytes() == expected
    with pytest.raises(ValueError, match=r"key_bits must be one of \(1, 2, 4, 8\)"):
        kvpack.TurboConfig(key_bits=3)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        kvpack.TurboConfig(seed=-1)
    with pytest.raises(ValueError, match="NaN/Inf"):
        kvpack.make_layer(kvpack.TurboConfig()).append(keys * float("nan"), keys)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_nearest_centroid_matches_bucketize_ties_included(bits):
    from kvpack.methods.turbo import _Codec, random_rotation

    codec = _Codec(bits, random_rotation(16, 0, 0), torch.float16)
    unit = torch.randn(300, 16, generator=torch.Generator().manual_seed(bits)) / 4
    ties = codec.bounds[:16]
    unit[0, : len(ties)] = ties  # exactly on a boundary: the lower cell, as bucketize
    assert torch.equal(codec._nearest(unit), torch.bucketize(unit, codec.bounds).to(torch.uint8))
    small = unit[:1, :32]  # a decode step's size: the broadcast comparison, same codes
    assert small.numel() <= turbo_module._BROADCAST_NEAREST < unit.numel()
    assert torch.equal(codec._nearest(small), torch.bucketize(small, codec.bounds).to(torch.uint8))


def test_head_dims_whose_codes_do_not_fill_whole_bytes_are_refused_at_the_first_append():
    layer = kvpack.make_layer(kvpack.TurboConfig(key_bits=1, value_bits=2, group_size=4, residual_length=8))
    with pytest.raises(ValueError, match=r"head_dim 12 at key_bits=1 does not fill whole bytes"):
        layer.append(torch.randn(1, 1, 3, 12), torch.randn(1, 1, 3, 12))
    assert layer.num_tokens == 0
    layer.append(torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16))  # 16 channels at 1 bit: two bytes
    assert layer.num_tokens == 3


@pytest.mark.parametrize("bits", [2, 4])
def test_norm_correction_keeps_each_tokens_norm_and_the_least_squares_fit_minimizes_the_error(bits):
    """norm_correction: the reconstruction has the token's norm (to the fp16 scale's rounding); the default
    least-squares scale has a smaller norm (shrinkage) and a smaller squared error, with the same codes."""
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(0)) * 3
    rotation = random_rotation(64, 0, 0)
    fit, nc = (_Codec(bits, rotation, torch.float16, norm_correction=flag) for flag in (False, True))
    (codes_fit, scale_fit), (codes_nc, scale_nc) = fit.encode(x), nc.encode(x)
    assert torch.equal(codes_fit, codes_nc)
    x_fit, x_nc = fit.decode(codes_fit, scale_fit), nc.decode(codes_nc, scale_nc)
    torch.testing.assert_close(x_nc.norm(dim=-1), x.norm(dim=-1), rtol=2e-3, atol=0)
    assert (x_fit.norm(dim=-1) < x.norm(dim=-1)).all()
    assert (x_fit - x).square().sum() < (x_nc - x).square().sum()
    with pytest.raises(ValueError, match="norm_correction must be one of"):
        kvpack.TurboConfig(norm_correction=True)
