import pytest
import torch

from kvpack.primitives import dequantize_affine, pack_bits, packed_length, quantize_affine, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape,dim", [((3, 5, 16), -1), ((7, 13), 1), ((2, 9, 3), 1), ((1,), 0), ((4, 0), 1)])
def test_pack_round_trip(bits, shape, dim):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=generator, dtype=torch.uint8)
    packed = pack_bits(codes, bits, dim)
    assert packed.dtype == torch.uint8
    assert packed.shape[dim] == packed_length(shape[dim], bits)
    assert torch.equal(unpack_bits(packed, bits, shape[dim], dim), codes)


def test_pack_layout_is_lsb_first():
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    packed = pack_bits(codes, 2)
    # word 0 holds codes 0..3 at bits [0,2), [2,4), [4,6), [6,8); word 1 holds code 4, zero padded
    assert packed.tolist() == [1 | (2 << 2) | (3 << 4) | (0 << 6), 3]
    signs = pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1)
    assert signs.tolist() == [0b10000001, 0b1]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_bits(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="exceeds"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 2, 5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantization_error_bound_and_endpoints(bits, dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 64, generator=generator) * 3).to(dtype)
    codes, scale, zero = quantize_affine(x, bits, 16, dim=-1)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.shape == (4, 6, 4) and scale.dtype == dtype
    x_hat = dequantize_affine(codes, scale, zero, 16, -1)
    groups = x.float().reshape(4, 6, 4, 16)
    spread = (groups.amax(-1) - groups.amin(-1)).unsqueeze(-1)
    # the bound holds exactly for the stored (rounded) scale; allow the storage rounding of min and scale
    eps = torch.finfo(dtype).eps
    slack = (groups.abs().amax(-1, keepdim=True) + spread) * eps * 2**bits
    err = (x_hat.reshape(4, 6, 4, 16) - groups).abs()
    assert (err <= spread / (2 * (2**bits - 1)) + slack).all()
    # the group minimum is reconstructed exactly (code 0 -> zero)
    assert torch.equal(x_hat.reshape(4, 6, 4, 16).amin(-1), zero.float())


@pytest.mark.parametrize("bits", [2, 4])
def test_quantization_along_middle_axis(bits):
    x = torch.randn(3, 64, 5)
    codes, scale, zero = quantize_affine(x, bits, 32, dim=1)
    assert scale.shape == (3, 2, 5)
    x_hat = dequantize_affine(codes, scale, zero, 32, dim=1)
    ref_codes, ref_scale, ref_zero = quantize_affine(x.transpose(1, 2), bits, 32, dim=-1)
    assert torch.equal(codes, ref_codes.transpose(1, 2))
    assert torch.equal(x_hat, dequantize_affine(ref_codes, ref_scale, ref_zero, 32, -1).transpose(1, 2))


def test_constant_groups_are_exact_and_finite():
    x = torch.full((2, 32), 1.2345)
    x[1] = 0.0
    codes, scale, zero = quantize_affine(x, 2, 32)
    x_hat = dequantize_affine(codes, scale, zero, 32)
    assert torch.equal(x_hat, x)
    assert torch.isfinite(scale).all() and (scale == 0).all()


def test_quantization_rejects_overflowing_scale():
    x = torch.tensor([[-1e5, 1e5] * 16])
    with pytest.raises(ValueError, match="overflows torch.float16"):
        quantize_affine(x, 2, 32, scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="group_size must divide"):
        quantize_affine(torch.randn(30), 2, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_affine(torch.randn(32), 3, 32)
