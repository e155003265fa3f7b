// Affine (min-max) codes read by the fused kernels: the block dot product shared by KIVI's key scores and
// the per-token value weighted sum (KIVI's and QJL's values). Included by methods/kivi/cpu.cpp and
// methods/qjl/cpu.cpp; internal linkage, one copy per translation unit (see kvpack.h).
//
// The inner loops (block_dot) read one byte row of packed codes at a time and accumulate in "bit-plane"
// order: 8 bytes widen to 8 lanes once, and each bit plane is one shift and mask; the element order is
// restored once per output block, not per code.
// Each code is dequantized once (fma(code, scale, zero), as the reference does) and then shared by all
// query rows. Factoring the zero point out (sum q (c s + z) = sum (q s) c + sum q z) saves that FMA but
// adds cancellation error beyond 2x the reference's, so it is not done.
#pragma once

#include "kvpack.h"

namespace kvpack {
namespace {

// One output block of CH elements (one channel's CH tokens for keys, one token's CH channels for values):
//   out[r][e] = sum_{i < count} w_i[r] * (code_i[e] * scale_i + zero_i),   r < ROWS, e < CH,
// where code_i is row i of packed bytes (NB = CH / PER bytes, codes LSB-first), scale_i / zero_i are
// element i0 + i * sz_stride of the scale/zero arrays, and w_i[r] = w[i * w_i + r * w_r].
struct BlockArgs {
  int64_t count;
  const uint8_t* bytes;
  int64_t byte_stride;
  const void* scale;
  const void* zero;
  int64_t sz_offset, sz_stride;
  int scale_type;
  const float* w;
  int64_t w_i, w_r;
  float* out;
  int64_t out_row;
};

template <int BITS, int CH, int ROWS>
void block_dot_scalar(const BlockArgs& a) {
  constexpr int PER = 8 / BITS, NB = CH / PER, MASK = (1 << BITS) - 1;
  float acc[ROWS][CH] = {};
  for (int64_t i = 0; i < a.count; ++i) {
    const uint8_t* bytes = a.bytes + i * a.byte_stride;
    const float scale = load_scale(a.scale, a.sz_offset + i * a.sz_stride, a.scale_type);
    const float zero = load_scale(a.zero, a.sz_offset + i * a.sz_stride, a.scale_type);
    float value[CH];
    for (int j = 0; j < NB; ++j)
      for (int s = 0; s < PER; ++s) value[j * PER + s] = std::fma((float)((bytes[j] >> (s * BITS)) & MASK), scale, zero);
    for (int r = 0; r < ROWS; ++r) {
      const float w = a.w[i * a.w_i + r * a.w_r];
      for (int e = 0; e < CH; ++e) acc[r][e] += w * value[e];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int e = 0; e < CH; ++e) a.out[r * a.out_row + e] = acc[r][e];
}

#if defined(__AVX2__) && defined(__FMA__)
// AVX2: 8 bytes widen to 8 int32 lanes; a "slot" (bit plane s of byte vector v) is one shift, one mask,
// one int->float conversion and one FMA (dequantization), shared by all rows, then one FMA per row.
// Lane l of slot (s, v) is element (8 v + l) * PER + s; the permutation is undone once, at the store.
// The CH / 8 slots are done S at a time so that ROWS * S accumulators stay in registers (AVX2 has 16).
template <int BITS, int CH, int ROWS, int P0>
inline void block_dot_pass(const BlockArgs& a) {
  constexpr int PER = 8 / BITS, NB = CH / PER, NV = NB / 8, P = PER * NV, MASK = (1 << BITS) - 1;
  constexpr int S0 = 8 / ROWS < 1 ? 1 : 8 / ROWS, S = S0 < P - P0 ? S0 : P - P0;
  __m256 acc[ROWS][S];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < S; ++j) acc[r][j] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(MASK);
  for (int64_t i = 0; i < a.count; ++i) {
    const uint8_t* bytes = a.bytes + i * a.byte_stride;
    const __m256 scale = _mm256_set1_ps(load_scale(a.scale, a.sz_offset + i * a.sz_stride, a.scale_type));
    const __m256 zero = _mm256_set1_ps(load_scale(a.zero, a.sz_offset + i * a.sz_stride, a.scale_type));
    __m256 w[ROWS];
    for (int r = 0; r < ROWS; ++r) w[r] = _mm256_broadcast_ss(a.w + i * a.w_i + r * a.w_r);
    for (int j = 0; j < S; ++j) {
      const int slot = P0 + j, s = slot / NV, v = slot % NV;
      const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * v)));
      const __m256i c = BITS == 8 ? x : _mm256_and_si256(_mm256_srli_epi32(x, s * BITS), mask);
      const __m256 value = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), scale, zero);
      for (int r = 0; r < ROWS; ++r) acc[r][j] = _mm256_fmadd_ps(w[r], value, acc[r][j]);
    }
  }
  alignas(32) float tmp[8];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < S; ++j) {
      const int slot = P0 + j, s = slot / NV, v = slot % NV;
      _mm256_store_ps(tmp, acc[r][j]);
      for (int l = 0; l < 8; ++l) a.out[r * a.out_row + (8 * v + l) * PER + s] = tmp[l];
    }
  if constexpr (P0 + S < P) block_dot_pass<BITS, CH, ROWS, P0 + S>(a);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512 (16 lanes, 32 registers): all PER bit planes in one pass. NB == 16: one iteration's bytes fill
// the vector. NB == 8: two consecutive iterations share it (lanes 0-7: i, 8-15: i + 1, with their scales,
// zeros and weights in the matching halves), and the halves, which hold the same elements, are added at the
// store. Lane l of plane s is element (l % NB) * PER + s.
inline __m512 halves(float lo, float hi) {
  return _mm512_mask_broadcastss_ps(_mm512_set1_ps(lo), 0xFF00, _mm_set_ss(hi));
}

template <int BITS, int CH, int ROWS>
inline void block_dot_512(const BlockArgs& a) {
  constexpr int PER = 8 / BITS, NB = CH / PER, MASK = (1 << BITS) - 1;
  constexpr bool PAIRS = NB == 8;
  __m512 acc[ROWS][PER];
  for (int r = 0; r < ROWS; ++r)
    for (int s = 0; s < PER; ++s) acc[r][s] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi32(MASK);
  const int64_t count = a.count, byte_stride = a.byte_stride, sz_stride = a.sz_stride, w_i = a.w_i, w_r = a.w_r;
  const float* w = a.w;
  auto plane_sums = [&](__m128i raw, __m512 scale, __m512 zero, const __m512* wr) {
    const __m512i x = _mm512_cvtepu8_epi32(raw);
    for (int s = 0; s < PER; ++s) {
      const __m512i c = BITS == 8 ? x : _mm512_and_si512(_mm512_srli_epi32(x, s * BITS), mask);
      const __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), scale, zero);
      for (int r = 0; r < ROWS; ++r) acc[r][s] = _mm512_fmadd_ps(wr[r], value, acc[r][s]);
    }
  };
  int64_t i = 0;
  const uint8_t* bytes = a.bytes;
  int64_t sz = a.sz_offset;
  if constexpr (PAIRS) {
    for (; i + 2 <= count; i += 2, bytes += 2 * byte_stride, sz += 2 * sz_stride) {
      const __m128i raw = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)),
                                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + byte_stride)));
      const __m512 scale = halves(load_scale(a.scale, sz, a.scale_type), load_scale(a.scale, sz + sz_stride, a.scale_type));
      const __m512 zero = halves(load_scale(a.zero, sz, a.scale_type), load_scale(a.zero, sz + sz_stride, a.scale_type));
      __m512 wr[ROWS];
      for (int r = 0; r < ROWS; ++r) wr[r] = halves(w[i * w_i + r * w_r], w[(i + 1) * w_i + r * w_r]);
      plane_sums(raw, scale, zero, wr);
    }
    if (i < count) {  // an odd count: the last iteration in the low half, weight 0 in the high half
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
      const __m512 scale = halves(load_scale(a.scale, sz, a.scale_type), 0.f);
      const __m512 zero = halves(load_scale(a.zero, sz, a.scale_type), 0.f);
      __m512 wr[ROWS];
      for (int r = 0; r < ROWS; ++r) wr[r] = halves(w[i * w_i + r * w_r], 0.f);
      plane_sums(raw, scale, zero, wr);
    }
  } else {
    for (; i < count; ++i, bytes += byte_stride, sz += sz_stride) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
      const __m512 scale = _mm512_set1_ps(load_scale(a.scale, sz, a.scale_type));
      const __m512 zero = _mm512_set1_ps(load_scale(a.zero, sz, a.scale_type));
      __m512 wr[ROWS];
      for (int r = 0; r < ROWS; ++r) wr[r] = _mm512_set1_ps(w[i * w_i + r * w_r]);
      plane_sums(raw, scale, zero, wr);
    }
  }
  alignas(64) float tmp[16];
  for (int r = 0; r < ROWS; ++r)
    for (int s = 0; s < PER; ++s) {
      _mm512_store_ps(tmp, acc[r][s]);
      float* out = a.out + r * a.out_row + s;
      if constexpr (PAIRS)
        for (int l = 0; l < 8; ++l) out[l * PER] = tmp[l] + tmp[l + 8];
      else
        for (int l = 0; l < 16; ++l) out[l * PER] = tmp[l];
    }
}
#endif

template <int BITS, int CH, int ROWS>
inline void block_dot(const BlockArgs& a) {
  constexpr int NB = CH / (8 / BITS);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (NB == 8 || NB == 16) return block_dot_512<BITS, CH, ROWS>(a);
#endif
  if constexpr (NB % 8 == 0)
    block_dot_pass<BITS, CH, ROWS, 0>(a);
  else
    block_dot_scalar<BITS, CH, ROWS>(a);
}
#else
template <int BITS, int CH, int ROWS>
inline void block_dot(const BlockArgs& a) {
  block_dot_scalar<BITS, CH, ROWS>(a);
}
#endif

// ---------------------------------------------------------------------------------------------------
// Value weighted sum: one (batch, head), channel block c (CH channels), tokens [t0, t1), ROWS rows.
//   weights (ROWS, T) with row stride w_row; codes (T, D / PER) with token stride codes_t; scale/zero
//   (T, D / G) with token stride scale_t; out (ROWS, D) with row stride out_row (written, not added).
template <int BITS, int CH, int ROWS>
void value_rows(const float* weights, int64_t w_row, const uint8_t* codes, int64_t codes_t, const void* scale,
                const void* zero, int64_t scale_t, int scale_type, float* out, int64_t out_row, int64_t t0,
                int64_t t1, int c, int G) {
  constexpr int PER = 8 / BITS, NB = CH / PER;
  const int g = c * CH / G;
  const BlockArgs a{t1 - t0, codes + t0 * codes_t + c * NB, codes_t, scale, zero, t0 * scale_t + g, scale_t,
                    scale_type, weights + t0, 1, w_row, out + c * CH, out_row};
  block_dot<BITS, CH, ROWS>(a);
}

template <int BITS, int CH>
void value_item(const float* weights, int64_t w_row, int M, const uint8_t* codes, int64_t codes_t,
                const void* scale, const void* zero, int64_t scale_t, int scale_type, float* out,
                int64_t out_row, int64_t t0, int64_t t1, int c, int G) {
  int m = 0;
  for (; m + 3 <= M; m += 3)
    value_rows<BITS, CH, 3>(weights + m * w_row, w_row, codes, codes_t, scale, zero, scale_t, scale_type,
                            out + m * out_row, out_row, t0, t1, c, G);
  if (M - m == 2)
    value_rows<BITS, CH, 2>(weights + m * w_row, w_row, codes, codes_t, scale, zero, scale_t, scale_type,
                            out + m * out_row, out_row, t0, t1, c, G);
  else if (M - m == 1)
    value_rows<BITS, CH, 1>(weights + m * w_row, w_row, codes, codes_t, scale, zero, scale_t, scale_type,
                            out + m * out_row, out_row, t0, t1, c, G);
}

using ValueItemFn = void (*)(const float*, int64_t, int, const uint8_t*, int64_t, const void*, const void*,
                             int64_t, int, float*, int64_t, int64_t, int64_t, int, int);

template <int BITS>
ValueItemFn pick_value_fn(int ch) {
  switch (ch) {
    case 32: return value_item<BITS, 32>;
    case 16: return value_item<BITS, 16>;
    default: return value_item<BITS, 8>;
  }
}

inline ValueItemFn value_fn(int bits, int ch) {
  switch (bits) {
    case 2: return pick_value_fn<2>(ch);
    case 4: return pick_value_fn<4>(ch);
    default: return pick_value_fn<8>(ch);
  }
}


inline int block_channels(int G) { return G % 32 == 0 ? 32 : (G % 16 == 0 ? 16 : 8); }

// Per-token affine values as a decode_attention Values policy (decode.h): codes (B, H, T, D * bits / 8)
// with strides codes_s[3] (last contiguous), scale/zero (B, H, T, D / G) with strides scale_s[3] (last
// contiguous). G % 8 == 0, bits in {2, 4, 8}.
struct AffineValues {
  static constexpr bool kRotated = false;
  const uint8_t* codes;
  const int64_t* codes_s;
  const void* scale;
  const void* zero;
  const int64_t* scale_s;
  int scale_type, D, G;
  ValueItemFn fn;
  int ch;

  AffineValues(const uint8_t* codes, const int64_t* codes_s, const void* scale, const void* zero,
               const int64_t* scale_s, int scale_type, int D, int G, int bits)
      : codes(codes), codes_s(codes_s), scale(scale), zero(zero), scale_s(scale_s), scale_type(scale_type), D(D),
        G(G), fn(value_fn(bits, block_channels(G))), ch(block_channels(G)) {}

  struct Scratch {
    std::vector<float> sums;  // (M, D): the kernels write their block sums, added to the caller's
    Scratch(const AffineValues&, int M, int D) : sums((size_t)M * D) {}
  };

  void accumulate(int64_t b, int64_t h, const float* w, int64_t w_row, int M, int64_t t0, int64_t t1, float* out,
                  int64_t out_row, Scratch& scratch) const {
    const int esize = scale_type == kF32 ? 4 : 2;
    const int64_t offset = (b * scale_s[0] + h * scale_s[1] + t0 * scale_s[2]) * esize;
    const char* sc = static_cast<const char*>(scale) + offset;
    const char* ze = static_cast<const char*>(zero) + offset;
    const uint8_t* cb = codes + b * codes_s[0] + h * codes_s[1] + t0 * codes_s[2];
    float* sums = scratch.sums.data();
    for (int c = 0; c < D / ch; ++c)
      fn(w, w_row, M, cb, codes_s[2], sc, ze, scale_s[2], scale_type, sums, D, 0, t1 - t0, c, G);
    for (int r = 0; r < M; ++r)
      for (int d = 0; d < D; ++d) out[r * out_row + d] += sums[r * D + d];
  }
  void finish(const float*, const float*, int, int, float*) const {}
};

}  // namespace
}  // namespace kvpack
