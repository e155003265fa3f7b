// Shared by every method's CPU kernels (kvpack/methods/<name>/cpu.cpp): scale types, half/bfloat16
// conversion, the thread-split helpers, and the ABI version (written only here; kvpack/kernels/native.py
// reads it from this file and refuses a library built from other sources).
//
// Plain C++ with an extern "C" ABI, called through ctypes: each entry point takes one pointer to an
// argument struct mirrored by a ctypes.Structure in the method's cpu.py, and checks nothing itself: the
// Python check of each kernel validates every shape, stride and index range first. No torch header is
// included, so the library compiles in seconds. It uses OpenMP; loaded after torch, it shares torch's
// libgomp (same soname) and so torch's thread pool.
//
// Layouts: B batch, H kv heads, M query rows per kv head, N key groups of G tokens, D head_dim, T tokens.
// Codes are packed LSB-first, 8 / BITS per byte.
#pragma once

#define KVPACK_ABI_VERSION 11

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <omp.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// Internal linkage (an unnamed namespace, one copy per translation unit), as when every kernel sat in one
// file: with -fPIC, external-linkage helpers could be interposed and were not inlined into the hot loops
// (measured: the KIVI kernels ran 1.3x slower).
namespace kvpack {
namespace {

enum ScaleType { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (!mant) {
    bits = sign;
  } else {  // subnormal half: renormalize
    exp = 113;
    while (!(mant & 0x400)) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

#if !defined(__F16C__)
inline uint16_t float_to_half_rne(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));  // inf / nan
  if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                                     // overflow
  if (x < 0x38800000u) {  // subnormal half or zero: add 0.5 (as a float) to round at the right place
    float magic;
    const uint32_t m = 0x3f000000u;  // 0.5f
    std::memcpy(&magic, &m, 4);
    float v;
    std::memcpy(&v, &x, 4);
    v += magic;
    uint32_t r;
    std::memcpy(&r, &v, 4);
    return (uint16_t)(sign | (r - m));
  }
  const uint32_t mant_odd = (x >> 13) & 1u;
  x += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return (uint16_t)(sign | (x >> 13));
}
#endif

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float load_scale(const void* base, int64_t i, int type) {
  switch (type) {
    case kF16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case kBF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// float -> stored scale type, rounding to nearest even as torch's Tensor.to does; returns the stored value
// read back as float, and writes the stored bits to dst[i].
inline float store_scale(void* dst, int64_t i, float x, int type) {
  if (type == kF32) {
    static_cast<float*>(dst)[i] = x;
    return x;
  }
  uint16_t h;
  if (type == kF16) {
#if defined(__F16C__)
    h = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
#else
    h = float_to_half_rne(x);
#endif
  } else {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    h = std::isnan(x) ? (uint16_t)0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  static_cast<uint16_t*>(dst)[i] = h;
  return type == kF16 ? half_to_float(h) : bf16_to_float(h);
}


// How many token segments to split each of base_items work items into so that `threads` threads stay busy
// (about 4 items per thread), never below 256 tokens per segment; 1 when the items alone suffice.
inline int64_t token_segments(int64_t base_items, int threads, int64_t T) {
  if (threads <= 1 || base_items >= 4 * threads) return 1;
  return std::min<int64_t>((4 * threads + base_items - 1) / base_items, std::max<int64_t>(1, T / 256));
}

// out[i] = sum over segments s of partial[s * size + i], in segment order (deterministic).
inline void sum_segments(const std::vector<float>& partial, int64_t segments, int64_t size, float* out) {
  for (int64_t i = 0; i < size; ++i) {
    float sum = 0.f;
    for (int64_t s = 0; s < segments; ++s) sum += partial[s * size + i];
    out[i] = sum;
  }
}

}  // namespace
}  // namespace kvpack
