"""Stateless pure-torch reference math: the oracle for every kernel."""

from .packing import PACK_BITS, pack_bits, packed_length, unpack_bits
from .quant import QUANT_BITS, dequantize_affine, quantize_affine, random_rotation

__all__ = [
    "PACK_BITS",
    "QUANT_BITS",
    "dequantize_affine",
    "pack_bits",
    "packed_length",
    "quantize_affine",
    "random_rotation",
    "unpack_bits",
]
