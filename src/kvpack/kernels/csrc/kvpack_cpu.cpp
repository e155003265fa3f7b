// Fused CPU decode kernels for kvpack (see kvpack/kernels/cpu.py, which builds and loads this file).
//
// Plain C++ with an extern "C" ABI, called through ctypes with raw pointers and strides: it includes no
// torch header, so it compiles in seconds. It uses OpenMP; loaded after torch, it shares torch's libgomp
// (same soname) and so torch's thread pool.
//
// Layouts (kvpack.kernels.reference documents them): B batch, H kv heads, M query rows per kv head,
// N key groups of G tokens, D head_dim, T tokens. Codes are packed LSB-first, 8 / BITS per byte.
//
// The inner loops (block_dot) read one byte row of packed codes at a time and accumulate in "bit-plane"
// order: 8 bytes widen to 8 lanes once, and each bit plane is one shift and mask; the element order is
// restored once per output block, not per code.
// Each code is dequantized once (fma(code, scale, zero), as the reference does) and then shared by all
// query rows. Factoring the zero point out (sum q (c s + z) = sum (q s) c + sum q z) saves that FMA but
// adds cancellation error beyond 2x the reference's, so it is not done.
// The turbo (rotated codebook) kernels have no zero point and one scale per token: keys use per-query
// lookup tables over packed bytes, values the same bit-plane loop with a codebook permute (see their section).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <omp.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

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

template <int BITS, int CH, int ROWS>
inline void block_dot(const BlockArgs& a) {
  if constexpr ((CH / (8 / BITS)) % 8 == 0)
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
// KIVI key scores: one (batch, head), groups [n0, n1), ROWS query rows.
//   query (ROWS, D) with row stride q_row; codes (N, D, G / PER) contiguous; scale/zero (N, D)
//   contiguous; out (ROWS, N * G) with row stride out_row.
template <int BITS, int CH, int ROWS>
void key_scores_rows(const float* query, int64_t q_row, const uint8_t* codes, const void* scale,
                     const void* zero, int scale_type, float* out, int64_t out_row, int64_t n0, int64_t n1,
                     int D, int G) {
  constexpr int PER = 8 / BITS, NB = CH / PER;
  const int group_bytes = G / PER;
  for (int64_t n = n0; n < n1; ++n)
    for (int c = 0; c < G / CH; ++c) {
      const BlockArgs a{D, codes + n * (int64_t)D * group_bytes + c * NB, group_bytes, scale, zero, n * D, 1,
                        scale_type, query, 1, q_row, out + n * G + c * CH, out_row};
      block_dot<BITS, CH, ROWS>(a);
    }
}

template <int BITS, int CH>
void key_scores_item(const float* query, int64_t q_row, int M, const uint8_t* codes, const void* scale,
                     const void* zero, int scale_type, float* out, int64_t out_row, int64_t n0, int64_t n1,
                     int D, int G) {
  int m = 0;
  for (; m + 3 <= M; m += 3)  // 3 rows: 12 (CH = 32) accumulator registers, the GQA 3 decode case in one pass
    key_scores_rows<BITS, CH, 3>(query + m * q_row, q_row, codes, scale, zero, scale_type, out + m * out_row,
                                 out_row, n0, n1, D, G);
  if (M - m == 2)
    key_scores_rows<BITS, CH, 2>(query + m * q_row, q_row, codes, scale, zero, scale_type, out + m * out_row,
                                 out_row, n0, n1, D, G);
  else if (M - m == 1)
    key_scores_rows<BITS, CH, 1>(query + m * q_row, q_row, codes, scale, zero, scale_type, out + m * out_row,
                                 out_row, n0, n1, D, G);
}

using KeyItemFn = void (*)(const float*, int64_t, int, const uint8_t*, const void*, const void*, int, float*,
                           int64_t, int64_t, int64_t, int, int);

template <int BITS>
KeyItemFn pick_key_fn(int ch) {
  switch (ch) {
    case 32: return key_scores_item<BITS, 32>;
    case 16: return key_scores_item<BITS, 16>;
    default: return key_scores_item<BITS, 8>;
  }
}

KeyItemFn key_fn(int bits, int ch) {
  switch (bits) {
    case 2: return pick_key_fn<2>(ch);
    case 4: return pick_key_fn<4>(ch);
    default: return pick_key_fn<8>(ch);
  }
}

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

ValueItemFn value_fn(int bits, int ch) {
  switch (bits) {
    case 2: return pick_value_fn<2>(ch);
    case 4: return pick_value_fn<4>(ch);
    default: return pick_value_fn<8>(ch);
  }
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

inline int block_channels(int G) { return G % 32 == 0 ? 32 : (G % 16 == 0 ? 16 : 8); }

// ---------------------------------------------------------------------------------------------------
// QJL: <x, sign> for ROWS vectors x (row stride xs) against one key's packed sign bits (bit p of the
// sketch in bit p % 8 of byte p / 8, 1 = positive). sum_p x_p s_p, s_p = +-1, is a sum of x with the
// sign bit flipped where the key's bit is 0: no multiplies, and the bits are expanded once for all rows.
template <int ROWS>
inline void sign_dots(const float* x, int64_t xs, int nbits, const uint8_t* bytes, float* dots) {
#if defined(__AVX2__)
  const __m256i shifts[4] = {
      _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24), _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
      _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8), _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int p = 0;
  for (; p + 32 <= nbits; p += 32) {  // one 32-bit word: 4 vectors of 8 coordinates
    uint32_t word;
    std::memcpy(&word, bytes + p / 8, 4);
    const __m256i w = _mm256_set1_epi32((int)word);
    for (int v = 0; v < 4; ++v) {
      // lane l of vector v: bit 8 v + l moved to the sign position; flip x where that bit is 0
      const __m256 flip = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_sllv_epi32(w, shifts[v])), sign_bit);
      for (int r = 0; r < ROWS; ++r)
        acc[r][v & 1] = _mm256_add_ps(acc[r][v & 1], _mm256_xor_ps(_mm256_loadu_ps(x + r * xs + p + 8 * v), flip));
    }
  }
  for (; p < nbits; p += 8) {  // remaining whole bytes
    const __m256i w = _mm256_set1_epi32((int)bytes[p / 8]);
    const __m256 flip = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_sllv_epi32(w, shifts[0])), sign_bit);
    for (int r = 0; r < ROWS; ++r)
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_xor_ps(_mm256_loadu_ps(x + r * xs + p), flip));
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m256 sum = _mm256_add_ps(acc[r][0], acc[r][1]);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    dots[r] = _mm_cvtss_f32(half);
  }
#else
  for (int r = 0; r < ROWS; ++r) {
    float sum = 0.f;
    for (int p = 0; p < nbits; ++p) sum += (bytes[p / 8] >> (p % 8)) & 1 ? x[r * xs + p] : -x[r * xs + p];
    dots[r] = sum;
  }
#endif
}

// QJL scores for one (batch, head), groups [n0, n1), ROWS query rows. sketched: S q (ROWS, m) with row
// stride sq_row; sketch_t (D, m) float32, the columns of S; outlier_idx (N, k); signs (N, G, m / 8);
// norms (N, G); outlier_signs (N, G, m_o / 8);
// outlier_norms (N, G); out (ROWS, N * G) with row stride out_row.
template <int ROWS>
void qjl_rows(const float* query, int64_t q_row, const float* sketched, int64_t sq_row, const float* sketch_t,
              int m, int m_o, int k, const uint8_t* outlier_idx, const uint8_t* signs, const void* norms,
              const uint8_t* outlier_signs, const void* outlier_norms, int norm_type, float* out, int64_t out_row,
              int64_t n0, int64_t n1, int G, int D, int* bad_index) {
  std::vector<float> buf((size_t)3 * ROWS * m);
  float* sq = buf.data();                 // (ROWS, m): S q
  float* sq_out = sq + (size_t)ROWS * m;  // (ROWS, m): S q_out, the outlier channels' part
  float* sq_in = sq_out + (size_t)ROWS * m;
  std::vector<const float*> columns(k);    // S[:, c] for the group's outlier channels c
  std::vector<float> q_out((size_t)ROWS * k);  // (ROWS, k): the query at those channels
  for (int r = 0; r < ROWS; ++r)
    for (int p = 0; p < m; ++p) sq[r * m + p] = sketched[r * sq_row + p];
  const float sqrt_half_pi = 1.2533141373155003f;
  const float c_in = sqrt_half_pi / m;
  const float c_out = m_o ? sqrt_half_pi / m_o : 0.f;
  const int bytes_in = m / 8, bytes_out = m_o / 8;
  float dots[ROWS];
  for (int64_t n = n0; n < n1; ++n) {
    const float* x_in = sq;
    if (k) {
      // S q_out = sum over outlier channels c of q_c S[:, c]; S q_in = S q - S q_out
      for (int i = 0; i < k; ++i) {
        int ch = outlier_idx[n * k + i];
        if (ch >= D) {  // a forged index: flag it and read channel 0 instead of memory past the buffers
          *bad_index = 1;
          ch = 0;
        }
        columns[i] = sketch_t + (int64_t)ch * m;
        for (int r = 0; r < ROWS; ++r) q_out[r * k + i] = query[r * q_row + ch];
      }
      for (int r = 0; r < ROWS; ++r) {
        const float* qo = q_out.data() + r * k;
        int p = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; p + 32 <= m; p += 32) {  // 4 independent FMA chains hide the FMA latency
          __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
          for (int i = 0; i < k; ++i) {
            const __m256 qi = _mm256_set1_ps(qo[i]);
            for (int v = 0; v < 4; ++v) acc[v] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(columns[i] + p + 8 * v), acc[v]);
          }
          for (int v = 0; v < 4; ++v) {
            _mm256_storeu_ps(sq_out + r * m + p + 8 * v, acc[v]);
            _mm256_storeu_ps(sq_in + r * m + p + 8 * v, _mm256_sub_ps(_mm256_loadu_ps(sq + r * m + p + 8 * v), acc[v]));
          }
        }
#endif
        for (; p < m; ++p) {
          float acc = 0.f;
          for (int i = 0; i < k; ++i) acc += qo[i] * columns[i][p];
          sq_out[r * m + p] = acc;
          sq_in[r * m + p] = sq[r * m + p] - acc;
        }
      }
      x_in = sq_in;
    }
    for (int g = 0; g < G; ++g) {
      const int64_t t = n * G + g;
      sign_dots<ROWS>(x_in, m, m, signs + t * bytes_in, dots);
      const float scale_in = c_in * load_scale(norms, t, norm_type);
      for (int r = 0; r < ROWS; ++r) out[r * out_row + t] = scale_in * dots[r];
      if (k && m_o) {
        sign_dots<ROWS>(sq_out, m, m_o, outlier_signs + t * bytes_out, dots);
        const float scale_out = c_out * load_scale(outlier_norms, t, norm_type);
        for (int r = 0; r < ROWS; ++r) out[r * out_row + t] += scale_out * dots[r];
      }
    }
  }
}


// ---------------------------------------------------------------------------------------------------
// Turbo (rotated codebook): each token t stores D codes of BITS bits, packed LSB-first along channels
// (NB = D * BITS / 8 bytes; channel d sits in bits (d % PER) * BITS of byte d / PER, PER = 8 / BITS), and
// one scale s_t. The rotated token is s_t * codebook[code_{t,d}] (the codebook already holds the 1/sqrt(D)).

// Key scores use a lookup table per query row over whole packed bytes: with
//   table[j][byte][r] = sum over the PER channels d of byte j of q_r[d] * codebook[code_d(byte)],
// a token's score is s_t * sum_{j < NB} table[j][byte_{t,j}][r]: NB lookups and adds instead of D
// unpack-and-FMAs (16 instead of 64 at D = 64, 2 bits). The W query rows of a chunk sit side by side in
// an entry, so one lookup is one W-wide vector add shared by all the rows (GQA: 3 rows per kv head fill
// W = 4). The table holds NB * 256 * W floats (64 KiB at D = 64, 2 bits, W = 4: L2, yet a lookup costs
// the same as with D = 32, whose table fits L1). Each entry is the sum of a low-nibble and a high-nibble
// entry; the build costs about as much as scoring a few hundred tokens and is done once per (batch,
// head, row chunk, token segment).
// Short segments use the nibble tables themselves (nibbles = true, bits < 8): entries (j, 0, n) and
// (j, 1, n) for the low and high nibble n of byte j, 32 per byte: two lookups per byte, but 8x cheaper
// to build. Measured at D = 64, 3 rows, 1-4 bits, they win below ~400-800 tokens (2-3x at 32-128).
constexpr int64_t kTurboNibbleBelow = 512;

// W floats, one per query row of a chunk: GCC/clang vector extensions, so that an add of two entries is
// one SSE (W = 4) or AVX (W = 8) instruction on any x86 build and the accumulators stay in registers
// (plain float[W] arrays were kept on the stack). may_alias: the table is also written as floats.
template <int W>
struct RowVec;
template <>
struct RowVec<4> {
  typedef float type __attribute__((vector_size(16), aligned(4), __may_alias__));
};
template <>
struct RowVec<8> {
  typedef float type __attribute__((vector_size(32), aligned(4), __may_alias__));
};

// The chunk's table (see above) from its rows q (rows <= W, row stride q_row; padded rows score 0).
template <int W>
void turbo_key_table(const float* q, int64_t q_row, int rows, int D, int bits, const float* codebook, bool nibbles,
                     float* table) {
  using V = typename RowVec<W>::type;
  const int per = 8 / bits, nb = D * bits / 8, mask = (1 << bits) - 1;
  std::vector<float> transposed((size_t)D * W);  // (D, W): channel d of the chunk's rows (padded rows: 0)
  for (int d = 0; d < D; ++d)
    for (int r = 0; r < W; ++r) transposed[d * W + r] = r < rows ? q[r * q_row + d] : 0.f;
  const V* query = reinterpret_cast<const V*>(transposed.data());
  V* entry = reinterpret_cast<V*>(table);  // entry (j, byte) is entry[j * 256 + byte]; nibbles: [j * 32 + ...]
  if (bits == 8) {  // one code per byte: the entry is the product itself
    for (int j = 0; j < nb; ++j)
      for (int c = 0; c < 256; ++c) entry[j * 256 + c] = query[j] * codebook[c];
    return;
  }
  const int half = per / 2;  // codes per nibble
  V lo[16], hi[16];
  for (int j = 0; j < nb; ++j, entry += nibbles ? 32 : 256) {
    const V* low = query + j * per;  // the low nibble's channels, then the high nibble's
    for (int n = 0; n < 16; ++n) {
      lo[n] = V{};
      hi[n] = V{};
      for (int s = 0; s < half; ++s) {
        const float value = codebook[(n >> (s * bits)) & mask];
        lo[n] += low[s] * value;
        hi[n] += low[half + s] * value;
      }
    }
    if (nibbles) {
      std::copy(lo, lo + 16, entry);
      std::copy(hi, hi + 16, entry + 16);
    } else {
      for (int b = 0; b < 256; ++b) entry[b] = lo[b & 15] + hi[b >> 4];
    }
  }
}

// Scores of tokens [t0, t1) for one row chunk: codes (T, NB) with token stride code_t, scale (T) with
// stride scale_t; out (rows, T) with row stride out_row. Four accumulators break the add chain.
template <int W, bool NIBBLES>
void turbo_key_tokens(const float* table, int nb, const uint8_t* codes, int64_t code_t, const void* scale,
                      int64_t scale_t, int scale_type, int64_t t0, int64_t t1, int rows, float* out, int64_t out_row) {
  using V = typename RowVec<W>::type;
  const V* entry = reinterpret_cast<const V*>(table);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* bytes = codes + t * code_t;
    V acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    const V* e = entry;  // byte j's entries start at e = entry + j * 256 (nibbles: j * 32)
    int j = 0;
    if constexpr (NIBBLES) {
      for (; j + 2 <= nb; j += 2, e += 64) {
        acc0 += e[bytes[j] & 15];
        acc1 += e[16 + (bytes[j] >> 4)];
        acc2 += e[32 + (bytes[j + 1] & 15)];
        acc3 += e[48 + (bytes[j + 1] >> 4)];
      }
      for (; j < nb; ++j, e += 32) acc0 += e[bytes[j] & 15] + e[16 + (bytes[j] >> 4)];
    } else {
      for (; j + 4 <= nb; j += 4, e += 4 * 256) {
        acc0 += e[bytes[j]];
        acc1 += e[256 + bytes[j + 1]];
        acc2 += e[512 + bytes[j + 2]];
        acc3 += e[768 + bytes[j + 3]];
      }
      for (; j < nb; ++j, e += 256) acc0 += e[bytes[j]];
    }
    const V acc = (acc0 + acc1) + (acc2 + acc3);
    const float s = load_scale(scale, t * scale_t, scale_type);
    for (int r = 0; r < rows; ++r) out[r * out_row + t] = s * acc[r];
  }
}

// One row chunk's scores over tokens [t0, t1): its table (byte or nibble tables), then the lookups.
template <int W>
void turbo_key_chunk(const float* q, int64_t q_row, int rows, int D, int bits, const float* codebook,
                     const uint8_t* codes, int64_t code_t, const void* scale, int64_t scale_t, int scale_type,
                     int64_t t0, int64_t t1, float* out, int64_t out_row, float* table) {
  const bool nibbles = bits < 8 && t1 - t0 < kTurboNibbleBelow;
  turbo_key_table<W>(q, q_row, rows, D, bits, codebook, nibbles, table);
  const auto score_tokens = nibbles ? turbo_key_tokens<W, true> : turbo_key_tokens<W, false>;
  score_tokens(table, D * bits / 8, codes, code_t, scale, scale_t, scale_type, t0, t1, rows, out, out_row);
}

// Value weighted sum over tokens [0, count) for ROWS rows, in the rotated basis:
//   out[r][d] = sum_i ws[r][i] * codebook[code_{i,d}],   ws[r][i] = w[r][i] * s_i (folded by the caller),
// codes (count, NB) with token stride code_t; out (ROWS, D) with row stride out_row (written, not added).
struct TurboValueArgs {
  int64_t count;
  const uint8_t* codes;
  int64_t code_t;
  int nb;
  const float* codebook;  // 2^BITS entries
  const float* ws;
  int64_t ws_row;
  float* out;
  int64_t out_row;
};

template <int BITS, int ROWS>
void turbo_value_scalar(const TurboValueArgs& a) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  const int D = a.nb * PER;
  std::vector<float> acc((size_t)ROWS * D, 0.f), value(D);
  for (int64_t i = 0; i < a.count; ++i) {
    const uint8_t* bytes = a.codes + i * a.code_t;
    for (int j = 0; j < a.nb; ++j)
      for (int s = 0; s < PER; ++s) value[j * PER + s] = a.codebook[(bytes[j] >> (s * BITS)) & MASK];
    for (int r = 0; r < ROWS; ++r) {
      const float w = a.ws[r * a.ws_row + i];
      for (int d = 0; d < D; ++d) acc[r * D + d] += w * value[d];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int d = 0; d < D; ++d) a.out[r * a.out_row + d] = acc[r * D + d];
}

#if defined(__AVX2__) && defined(__FMA__)
// AVX2, KIVI's bit-plane order (see block_dot_pass): 8 bytes widen to 8 int32 lanes once; bit plane s
// is one shift and mask, then the codebook lookup is a register permute (vpermps: 2 or 4 entries; 16
// entries: two permutes and a blend on bit 3; 256 entries: a gather), shared by all rows, then one FMA
// per row. Lane l of slot (s, v) is channel (8 v + l) * PER + s; the order is restored at the store.
// One pass covers byte vector v (runtime) and planes [P0, P0 + S), S chosen to keep ROWS * S
// accumulators in registers.
template <int BITS>
inline __m256 turbo_lookup(__m256i code, __m256 cb_lo, __m256 cb_hi, const float* codebook) {
  if constexpr (BITS == 8) {
    return _mm256_i32gather_ps(codebook, code, 4);
  } else if constexpr (BITS == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(cb_lo, code), hi = _mm256_permutevar8x32_ps(cb_hi, code);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));  // bit 3 -> sign
  } else {
    (void)cb_hi;
    (void)codebook;
    return _mm256_permutevar8x32_ps(cb_lo, code);
  }
}

template <int BITS, int ROWS, int P0>
inline void turbo_value_pass(const TurboValueArgs& a, int v, __m256 cb_lo, __m256 cb_hi) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  constexpr int S0 = 8 / ROWS < 1 ? 1 : 8 / ROWS, S = S0 < PER - P0 ? S0 : PER - P0;
  __m256 acc[ROWS][S];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < S; ++j) acc[r][j] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(MASK);
  const int64_t count = a.count, code_t = a.code_t, ws_row = a.ws_row;  // locals: no reload per token
  const float* ws = a.ws;
  const uint8_t* bytes = a.codes + 8 * v;
  for (int64_t i = 0; i < count; ++i, bytes += code_t) {
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    __m256 w[ROWS];
    for (int r = 0; r < ROWS; ++r) w[r] = _mm256_broadcast_ss(ws + r * ws_row + i);
    for (int j = 0; j < S; ++j) {
      const int s = P0 + j;
      const __m256i code = BITS == 8 ? x : _mm256_and_si256(_mm256_srli_epi32(x, s * BITS), mask);
      const __m256 value = turbo_lookup<BITS>(code, cb_lo, cb_hi, a.codebook);
      for (int r = 0; r < ROWS; ++r) acc[r][j] = _mm256_fmadd_ps(w[r], value, acc[r][j]);
    }
  }
  alignas(32) float sums[ROWS][S][8];  // a copy, so that acc itself stays in registers in the loop above
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < S; ++j) _mm256_store_ps(sums[r][j], acc[r][j]);
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < S; ++j)
      for (int l = 0; l < 8; ++l) a.out[r * a.out_row + (8 * v + l) * PER + P0 + j] = sums[r][j][l];
  if constexpr (P0 + S < PER) turbo_value_pass<BITS, ROWS, P0 + S>(a, v, cb_lo, cb_hi);
}

template <int BITS, int ROWS>
void turbo_value_rows(const TurboValueArgs& a) {
  if (a.nb % 8) return turbo_value_scalar<BITS, ROWS>(a);
  float padded[16] = {};  // the codebook in registers: entries 0-7 and 8-15 (zeros past 2^BITS)
  for (int c = 0; c < (BITS == 8 ? 16 : 1 << BITS); ++c) padded[c] = a.codebook[c];
  const __m256 cb_lo = _mm256_loadu_ps(padded), cb_hi = _mm256_loadu_ps(padded + 8);
  for (int v = 0; v < a.nb / 8; ++v) turbo_value_pass<BITS, ROWS, 0>(a, v, cb_lo, cb_hi);
}
#else
template <int BITS, int ROWS>
void turbo_value_rows(const TurboValueArgs& a) {
  turbo_value_scalar<BITS, ROWS>(a);
}
#endif

// All M rows of one (batch, head, token segment), in chunks of at most 4 rows (3 for the GQA-3 case).
template <int BITS>
void turbo_value_item(TurboValueArgs a, int M) {
  const float* ws = a.ws;
  float* out = a.out;
  for (int m = 0; m < M;) {
    const int rows = M - m >= 4 ? 4 : M - m;
    a.ws = ws + m * a.ws_row;
    a.out = out + m * a.out_row;
    switch (rows) {
      case 4: turbo_value_rows<BITS, 4>(a); break;
      case 3: turbo_value_rows<BITS, 3>(a); break;
      case 2: turbo_value_rows<BITS, 2>(a); break;
      default: turbo_value_rows<BITS, 1>(a); break;
    }
    m += rows;
  }
}

// ---------------------------------------------------------------------------------------------------
// Quantize and pack, bit for bit as kvpack.primitives.quantize_affine + pack_bits: for a group x of n
// values (float32 arithmetic), zero = stored(min x), scale = stored((max x - min x) / (2^bits - 1)),
// code = clamp(round_half_even((x - zero) / scale), 0, 2^bits - 1), 0 where scale == 0.
// Returns false if the stored scale or zero is not finite or x holds a NaN (the caller then runs the
// reference, which raises).
inline bool quantize_group(const float* x, int n, int64_t x_step, int bits, void* scale, void* zero, int64_t sz_i,
                           int scale_type, uint8_t* codes) {
  float lo = x[0], hi = x[0];
  bool nan = false;
  for (int j = 0; j < n; ++j) {
    const float v = x[j * x_step];
    nan |= v != v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  if (nan) return false;  // the reference's NaN scale: let it raise
  const float maxcode = (float)((1 << bits) - 1);
  const float z = store_scale(zero, sz_i, lo, scale_type);
  const float s = store_scale(scale, sz_i, (hi - lo) / maxcode, scale_type);
  if (!std::isfinite(z) || !std::isfinite(s)) return false;
  if (s > 0.f) {
    for (int j = 0; j < n; ++j) {
      float c = std::nearbyint((x[j * x_step] - z) / s);
      c = c < 0.f ? 0.f : (c > maxcode ? maxcode : c);
      codes[j] = (uint8_t)c;
    }
  } else {
    std::memset(codes, 0, n);
  }
  return true;
}

inline void pack_codes(const uint8_t* codes, int n, int bits, uint8_t* out) {
  const int per = 8 / bits;
  for (int w = 0; w < (n + per - 1) / per; ++w) {
    uint8_t byte = 0;
    for (int j = 0; j < per && w * per + j < n; ++j) byte |= (uint8_t)(codes[w * per + j] << (j * bits));
    out[w] = byte;
  }
}

}  // namespace

extern "C" {

int kvpack_abi_version() { return 8; }

// The entry points called from Python take two arrays, so that a ctypes call converts two arguments:
// meta (int64: strides, sizes, flags; layouts below) and ptrs (the tensors' data pointers).

// q (B, H, M, D) float32 with strides q_s[4] (q_s[3] == 1); codes (B, H, N, D, G * bits / 8) uint8 with
// batch/head strides codes_s[2] and the rest contiguous; scale/zero (B, H, N, D) with batch/head strides
// scale_s[2], rest contiguous; out (B, H, M, N * G) float32 contiguous. G % 8 == 0.
static void kvpack_kivi_key_scores_impl(const float* q, const int64_t* q_s, const uint8_t* codes, const int64_t* codes_s,
                            const void* scale, const void* zero, const int64_t* scale_s, int scale_type,
                            float* out, int64_t B, int64_t H, int M, int64_t N, int D, int G, int bits,
                            int threads) {
  const int ch = block_channels(G);
  const KeyItemFn fn = key_fn(bits, ch);
  const int esize = scale_type == kF32 ? 4 : 2;
  // Work items: (batch, head, block of groups); blocks of ~512 tokens keep the two cores balanced at B = 1.
  const int64_t per_block = std::max<int64_t>(1, 512 / G);
  const int64_t blocks = (N + per_block - 1) / per_block;
  const int64_t items = B * H * blocks;
  const int64_t out_row = N * G;
  const double work = (double)B * H * M * N * G * D;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work > 2e5)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t bh = it / blocks, blk = it % blocks;
    const int64_t b = bh / H, h = bh % H;
    const int64_t n0 = blk * per_block, n1 = std::min(N, n0 + per_block);
    const char* sc = static_cast<const char*>(scale) + (b * scale_s[0] + h * scale_s[1]) * esize;
    const char* ze = static_cast<const char*>(zero) + (b * scale_s[0] + h * scale_s[1]) * esize;
    fn(q + b * q_s[0] + h * q_s[1], q_s[2], M, codes + b * codes_s[0] + h * codes_s[1], sc, ze, scale_type,
       out + (b * H + h) * M * out_row, out_row, n0, n1, D, G);
  }
}

// w (B, H, M, T) float32 with strides w_s[4] (w_s[3] == 1); codes (B, H, T, D * bits / 8) uint8 with
// strides codes_s[3] (last contiguous); scale/zero (B, H, T, D / G) with strides scale_s[3] (last
// contiguous); out (B, H, M, D) float32 contiguous. G % 8 == 0.
static void kvpack_value_weighted_sum_impl(const float* w, const int64_t* w_s, const uint8_t* codes, const int64_t* codes_s,
                               const void* scale, const void* zero, const int64_t* scale_s, int scale_type,
                               float* out, int64_t B, int64_t H, int M, int64_t T, int D, int G, int bits,
                               int threads) {
  const int ch = block_channels(G);
  const ValueItemFn fn = value_fn(bits, ch);
  const int esize = scale_type == kF32 ? 4 : 2;
  const int chunks = D / ch;
  const double work = (double)B * H * M * T * D;
  // Split tokens into segments when (batch, head, channel block) alone cannot keep the threads busy;
  // segments write partial sums that are added afterwards.
  const int64_t base_items = B * H * chunks;
  const int64_t segments = token_segments(base_items, threads, T);
  const int64_t seg_len = (T + segments - 1) / segments;
  std::vector<float> partial;
  if (segments > 1) partial.assign((size_t)(segments * B * H * M * D), 0.f);
  const int64_t items = base_items * segments;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work > 2e5)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t seg = it / base_items, rest = it % base_items;
    const int64_t bh = rest / chunks;
    const int c = (int)(rest % chunks);
    const int64_t b = bh / H, h = bh % H;
    const int64_t t0 = seg * seg_len, t1 = std::min(T, t0 + seg_len);
    float* dst = segments > 1 ? partial.data() + ((seg * B + b) * H + h) * M * D : out + (b * H + h) * M * D;
    if (t0 >= t1) {
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < ch; ++i) dst[m * D + c * ch + i] = 0.f;
      continue;
    }
    const char* sc = static_cast<const char*>(scale) + (b * scale_s[0] + h * scale_s[1]) * esize;
    const char* ze = static_cast<const char*>(zero) + (b * scale_s[0] + h * scale_s[1]) * esize;
    fn(w + b * w_s[0] + h * w_s[1], w_s[2], M, codes + b * codes_s[0] + h * codes_s[1], codes_s[2], sc, ze,
       scale_s[2], scale_type, dst, D, t0, t1, c, G);
  }
  if (segments > 1) sum_segments(partial, segments, B * H * M * D, out);
}

// q (B, H, M, D) float32 with strides q_s[4] (q_s[3] == 1); sq = S q (B, H, M, m) float32 contiguous;
// sketch_t (D, m) contiguous;
// outlier_idx (B, H, N, k) uint8, signs (B, H, N, G, m / 8), norms (B, H, N, G), outlier_signs
// (B, H, N, G, m_o / 8), outlier_norms (B, H, N, G): batch/head strides in idx_s, signs_s, norms_s,
// osigns_s, onorms_s (2 each), the rest contiguous; out (B, H, M, N * G) float32 contiguous.
static int kvpack_qjl_key_scores_impl(const float* q, const int64_t* q_s, const float* sq, const float* sketch_t,
                           const uint8_t* outlier_idx, const int64_t* idx_s, const uint8_t* signs,
                           const int64_t* signs_s, const void* norms, const int64_t* norms_s,
                           const uint8_t* outlier_signs, const int64_t* osigns_s, const void* outlier_norms,
                           const int64_t* onorms_s, int norm_type, float* out, int64_t B, int64_t H, int M,
                           int64_t N, int D, int G, int m, int m_o, int k, int threads) {
  const int esize = norm_type == kF32 ? 4 : 2;
  const int64_t per_block = std::max<int64_t>(1, 512 / G);
  const int64_t blocks = (N + per_block - 1) / per_block;
  const int64_t items = B * H * blocks;
  const int64_t out_row = N * G;
  const double work = (double)B * H * M * N * G * (m + m_o) / 8;
  int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : bad) if (threads > 1 && work > 2e5)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t bh = it / blocks, blk = it % blocks;
    const int64_t b = bh / H, h = bh % H;
    const int64_t n0 = blk * per_block, n1 = std::min(N, n0 + per_block);
    const float* qb = q + b * q_s[0] + h * q_s[1];
    const float* sqb = sq + (b * H + h) * M * m;
    const uint8_t* ib = outlier_idx ? outlier_idx + b * idx_s[0] + h * idx_s[1] : nullptr;
    const uint8_t* sb = signs + b * signs_s[0] + h * signs_s[1];
    const void* nb = static_cast<const char*>(norms) + (b * norms_s[0] + h * norms_s[1]) * esize;
    const uint8_t* ob = outlier_signs ? outlier_signs + b * osigns_s[0] + h * osigns_s[1] : nullptr;
    const void* onb =
        outlier_norms ? static_cast<const char*>(outlier_norms) + (b * onorms_s[0] + h * onorms_s[1]) * esize : nullptr;
    float* ob_out = out + (b * H + h) * M * out_row;
    int r = 0;
    for (; r + 4 <= M; r += 4)
      qjl_rows<4>(qb + r * q_s[2], q_s[2], sqb + r * m, m, sketch_t, m, m_o, k, ib, sb, nb, ob, onb, norm_type,
                  ob_out + r * out_row, out_row, n0, n1, G, D, &bad);
    switch (M - r) {
      case 3: qjl_rows<3>(qb + r * q_s[2], q_s[2], sqb + r * m, m, sketch_t, m, m_o, k, ib, sb, nb, ob, onb, norm_type,
                          ob_out + r * out_row, out_row, n0, n1, G, D, &bad); break;
      case 2: qjl_rows<2>(qb + r * q_s[2], q_s[2], sqb + r * m, m, sketch_t, m, m_o, k, ib, sb, nb, ob, onb, norm_type,
                          ob_out + r * out_row, out_row, n0, n1, G, D, &bad); break;
      case 1: qjl_rows<1>(qb + r * q_s[2], q_s[2], sqb + r * m, m, sketch_t, m, m_o, k, ib, sb, nb, ob, onb, norm_type,
                          ob_out + r * out_row, out_row, n0, n1, G, D, &bad); break;
      default: break;
    }
  }
  return bad;
}

// Values: x (B, H, T, D) of x_type with strides x_s[4] (x_s[3] == 1) -> codes (B, H, T, ceil(D * bits / 8))
// uint8, scale/zero (B, H, T, D / G) of scale_type, all contiguous. Groups of G consecutive channels.
// Returns 0, or 1 when a scale or zero overflows the scale type.
static int kvpack_quantize_tokens_impl(const void* x, int x_type, const int64_t* x_s, int64_t B, int64_t H, int64_t T, int D,
                           int G, int bits, uint8_t* codes, void* scale, void* zero, int scale_type, int threads) {
  const int64_t rows = B * H * T;
  const int row_bytes = (D * bits + 7) / 8, groups = D / G;
  int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad) if (threads > 1 && rows * D > 1 << 16)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / (H * T), h = (row / T) % H, t = row % T;
    const int64_t base = b * x_s[0] + h * x_s[1] + t * x_s[2];
    std::vector<float> buf(D);
    std::vector<uint8_t> row_codes(D);
    for (int d = 0; d < D; ++d) buf[d] = load_scale(x, base + d, x_type);
    for (int g = 0; g < groups; ++g)
      bad |= !quantize_group(buf.data() + g * G, G, 1, bits, scale, zero, row * groups + g, scale_type,
                             row_codes.data() + g * G);
    pack_codes(row_codes.data(), D, bits, codes + row * row_bytes);
  }
  return bad;
}

// Keys: x (B, H, N * G, D) of x_type with strides x_s[4] (x_s[3] == 1) -> codes (B, H, N, D, ceil(G * bits /
// 8)) uint8, scale/zero (B, H, N, D) of scale_type, all contiguous. Each channel's G tokens form a group.
static int kvpack_quantize_key_groups_impl(const void* x, int x_type, const int64_t* x_s, int64_t B, int64_t H, int64_t N,
                               int D, int G, int bits, uint8_t* codes, void* scale, void* zero, int scale_type,
                               int threads) {
  const int64_t items = B * H * N;
  const int group_bytes = (G * bits + 7) / 8;
  int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad) if (threads > 1 && items * G * D > 1 << 16)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / (H * N), h = (item / N) % H, n = item % N;
    std::vector<float> tile((size_t)D * G);  // (D, G): the group transposed, a channel's tokens contiguous
    std::vector<uint8_t> channel_codes(G);
    for (int j = 0; j < G; ++j) {
      const int64_t base = b * x_s[0] + h * x_s[1] + (n * G + j) * x_s[2];
      for (int d = 0; d < D; ++d) tile[(size_t)d * G + j] = load_scale(x, base + d, x_type);
    }
    for (int d = 0; d < D; ++d) {
      bad |= !quantize_group(tile.data() + (size_t)d * G, G, 1, bits, scale, zero, item * D + d, scale_type,
                             channel_codes.data());
      pack_codes(channel_codes.data(), G, bits, codes + (item * D + d) * group_bytes);
    }
  }
  return bad;
}

// Sign bits: x (rows, m) float32 with row stride x_row (unit stride inside a row) -> out (rows, ceil(m / 8))
// uint8 contiguous, bit p % 8 of byte p / 8 set iff x[p] > 0 (as pack_bits((x > 0).to(uint8), 1)).
static void kvpack_pack_signs_impl(const float* x, int64_t x_row, int64_t rows, int m, uint8_t* out, int threads) {
  const int bytes = (m + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * m > 1 << 18)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * x_row;
    uint8_t* dst = out + r * bytes;
    int p = 0;
#if defined(__AVX2__)
    for (; p + 8 <= m; p += 8)  // movemask: lane l's sign bit -> bit l; x > 0 is the compare's mask
      dst[p / 8] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + p), _mm256_setzero_ps(), _CMP_GT_OQ));
#endif
    for (; p < m; p += 8) {
      uint8_t byte = 0;
      for (int j = 0; j < 8 && p + j < m; ++j) byte |= (uint8_t)((row[p + j] > 0.f) << j);
      dst[p / 8] = byte;
    }
  }
}

// Turbo key scores: q (B, H, M, D) float32 rotated queries with strides q_s[4] (q_s[3] == 1); codes
// (B, H, T, D * bits / 8) uint8 with strides codes_s[3] (last contiguous); scale (B, H, T) with strides
// scale_s[3]; codebook (2^bits) float32; out (B, H, M, T) float32 contiguous. D * bits % 8 == 0.
static void kvpack_turbo_key_scores_impl(const float* q, const int64_t* q_s, const uint8_t* codes,
                                         const int64_t* codes_s, const void* scale, const int64_t* scale_s,
                                         int scale_type, const float* codebook, float* out, int64_t B, int64_t H,
                                         int M, int64_t T, int D, int bits, int threads) {
  const int nb = D * bits / 8;
  const int esize = scale_type == kF32 ? 4 : 2;
  // Row chunks: 8 rows (one AVX vector per entry) while more than 4 remain, then one chunk of <= 4 (SSE).
  const int wide = M > 4 ? (M - 4 + 7) / 8 : 0;
  const int chunks = wide + (M - 8 * wide > 0);
  // Work items: (batch, head, row chunk, token segment). Tokens are split only when the other axes
  // cannot keep the threads busy, into segments of >= 2048 tokens, so that the table each segment builds
  // stays a small part of its work.
  const int64_t base_items = B * H * chunks;
  int64_t segments = 1;
  if (threads > 1 && base_items < 4 * threads)
    segments = std::min<int64_t>((4 * threads + base_items - 1) / base_items, std::max<int64_t>(1, T / 2048));
  const int64_t seg_len = (T + segments - 1) / segments;
  const int64_t items = base_items * segments;
  const double work = (double)B * H * chunks * T * nb;
#pragma omp parallel num_threads(threads) if (threads > 1 && work > 2e5)
  {
    std::unique_ptr<float[]> table(new float[(size_t)nb * 256 * 8]);  // per thread, reused across items
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t seg = it / base_items, rest = it % base_items;
      const int64_t bh = rest / chunks, b = bh / H, h = bh % H;
      const int chunk = (int)(rest % chunks);
      const int r0 = 8 * chunk, rows = std::min(M - r0, 8);
      const int64_t t0 = seg * seg_len, t1 = std::min(T, t0 + seg_len);
      if (t0 >= t1) continue;
      const float* qc = q + b * q_s[0] + h * q_s[1] + r0 * q_s[2];
      const uint8_t* cb = codes + b * codes_s[0] + h * codes_s[1];
      const char* sc = static_cast<const char*>(scale) + (b * scale_s[0] + h * scale_s[1]) * esize;
      float* dst = out + ((b * H + h) * M + r0) * T;
      const auto chunk_scores = chunk < wide ? turbo_key_chunk<8> : turbo_key_chunk<4>;
      chunk_scores(qc, q_s[2], rows, D, bits, codebook, cb, codes_s[2], sc, scale_s[2], scale_type, t0, t1, dst, T,
                   table.get());
    }
  }
}

// Turbo weighted sum: w (B, H, M, T) float32 with strides w_s[4] (w_s[3] == 1); codes (B, H, T,
// D * bits / 8) uint8 with strides codes_s[3] (last contiguous); scale (B, H, T) with strides scale_s[3];
// codebook (2^bits) float32; out (B, H, M, D) float32 contiguous, in the rotated basis.
static void kvpack_turbo_weighted_sum_impl(const float* w, const int64_t* w_s, const uint8_t* codes,
                                           const int64_t* codes_s, const void* scale, const int64_t* scale_s,
                                           int scale_type, const float* codebook, float* out, int64_t B,
                                           int64_t H, int M, int64_t T, int D, int bits, int threads) {
  using ItemFn = void (*)(TurboValueArgs, int);
  const ItemFn fn = bits == 1   ? turbo_value_item<1>
                    : bits == 2 ? turbo_value_item<2>
                    : bits == 4 ? turbo_value_item<4>
                                : turbo_value_item<8>;
  const int esize = scale_type == kF32 ? 4 : 2;
  // Work items: (batch, head, token segment); segments (partial sums, added afterwards) only when
  // (batch, head) alone cannot keep the threads busy.
  const int64_t base_items = B * H;
  const int64_t segments = token_segments(base_items, threads, T);
  const int64_t seg_len = (T + segments - 1) / segments;
  std::vector<float> partial;
  if (segments > 1) partial.assign((size_t)(segments * B * H * M * D), 0.f);
  const int64_t items = base_items * segments;
  const double work = (double)B * H * M * T * D;
#pragma omp parallel num_threads(threads) if (threads > 1 && work > 2e5)
  {
    std::vector<float> ws;  // (M, segment) folded weights w * s_t, per thread
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t seg = it / base_items, bh = it % base_items, b = bh / H, h = bh % H;
      const int64_t t0 = seg * seg_len, t1 = std::min(T, t0 + seg_len), count = t1 - t0;
      float* dst = (segments > 1 ? partial.data() + seg * B * H * M * D : out) + bh * M * D;
      if (count <= 0) {
        std::fill(dst, dst + (int64_t)M * D, 0.f);
        continue;
      }
      const float* wb = w + b * w_s[0] + h * w_s[1];
      const char* sc = static_cast<const char*>(scale) + (b * scale_s[0] + h * scale_s[1]) * esize;
      ws.resize((size_t)M * count);
      for (int64_t i = 0; i < count; ++i) {
        const float s = load_scale(sc, (t0 + i) * scale_s[2], scale_type);
        for (int r = 0; r < M; ++r) ws[r * count + i] = wb[r * w_s[2] + t0 + i] * s;
      }
      const TurboValueArgs a{count, codes + b * codes_s[0] + h * codes_s[1] + t0 * codes_s[2], codes_s[2],
                             D * bits / 8, codebook, ws.data(), count, dst, D};
      fn(a, M);
    }
  }
  if (segments > 1) sum_segments(partial, segments, B * H * M * D, out);
}

// ptrs: q, codes, scale, zero, out. meta: q strides (4), codes batch/head strides (2), scale batch/head
// strides (2), scale_type, B, H, M, N, D, G, bits, threads.
void kvpack_kivi_key_scores(const int64_t* m, void* const* p) {
  kvpack_kivi_key_scores_impl(static_cast<const float*>(p[0]), m, static_cast<const uint8_t*>(p[1]), m + 4, p[2],
                              p[3], m + 6, (int)m[8], static_cast<float*>(p[4]), m[9], m[10], (int)m[11], m[12],
                              (int)m[13], (int)m[14], (int)m[15], (int)m[16]);
}

// ptrs: weights, codes, scale, zero, out. meta: weights strides (4), codes strides (3), scale strides (3),
// scale_type, B, H, M, T, D, G, bits, threads.
void kvpack_value_weighted_sum(const int64_t* m, void* const* p) {
  kvpack_value_weighted_sum_impl(static_cast<const float*>(p[0]), m, static_cast<const uint8_t*>(p[1]), m + 4, p[2],
                                 p[3], m + 7, (int)m[10], static_cast<float*>(p[4]), m[11], m[12], (int)m[13], m[14],
                                 (int)m[15], (int)m[16], (int)m[17], (int)m[18]);
}

// ptrs: q, sq, sketch_t, outlier_idx, signs, norms, outlier_signs, outlier_norms, out. meta: q strides (4),
// then batch/head strides (2 each) of outlier_idx, signs, norms, outlier_signs, outlier_norms, then
// norm_type, B, H, M, N, D, G, m, m_o, k, threads.
// Returns 1 when an outlier index is >= D (those channels read as channel 0), else 0.
int kvpack_qjl_key_scores(const int64_t* m, void* const* p) {
  return kvpack_qjl_key_scores_impl(static_cast<const float*>(p[0]), m, static_cast<const float*>(p[1]),
                             static_cast<const float*>(p[2]), static_cast<const uint8_t*>(p[3]), m + 4,
                             static_cast<const uint8_t*>(p[4]), m + 6, p[5], m + 8,
                             static_cast<const uint8_t*>(p[6]), m + 10, p[7], m + 12, (int)m[14],
                             static_cast<float*>(p[8]), m[15], m[16], (int)m[17], m[18], (int)m[19], (int)m[20],
                             (int)m[21], (int)m[22], (int)m[23], (int)m[24]);
}

// ptrs: x, codes, scale, zero. meta: x_type, x strides (4), B, H, T, D, G, bits, scale_type, threads.
int kvpack_quantize_tokens(const int64_t* m, void* const* p) {
  return kvpack_quantize_tokens_impl(p[0], (int)m[0], m + 1, m[5], m[6], m[7], (int)m[8], (int)m[9], (int)m[10],
                                     static_cast<uint8_t*>(p[1]), p[2], p[3], (int)m[11], (int)m[12]);
}

// ptrs: x, codes, scale, zero. meta: x_type, x strides (4), B, H, N, D, G, bits, scale_type, threads.
int kvpack_quantize_key_groups(const int64_t* m, void* const* p) {
  return kvpack_quantize_key_groups_impl(p[0], (int)m[0], m + 1, m[5], m[6], m[7], (int)m[8], (int)m[9],
                                         (int)m[10], static_cast<uint8_t*>(p[1]), p[2], p[3], (int)m[11],
                                         (int)m[12]);
}

// ptrs: x, out. meta: x row stride, rows, m, threads.
void kvpack_pack_signs(const int64_t* m, void* const* p) {
  kvpack_pack_signs_impl(static_cast<const float*>(p[0]), m[0], m[1], (int)m[2], static_cast<uint8_t*>(p[1]),
                         (int)m[3]);
}

// ptrs: q, codes, scale, codebook, out. meta: q strides (4), codes strides (3), scale strides (3),
// scale_type, B, H, M, T, D, bits, threads.
void kvpack_turbo_key_scores(const int64_t* m, void* const* p) {
  kvpack_turbo_key_scores_impl(static_cast<const float*>(p[0]), m, static_cast<const uint8_t*>(p[1]), m + 4, p[2],
                               m + 7, (int)m[10], static_cast<const float*>(p[3]), static_cast<float*>(p[4]),
                               m[11], m[12], (int)m[13], m[14], (int)m[15], (int)m[16], (int)m[17]);
}

// ptrs: weights, codes, scale, codebook, out. meta: weights strides (4), codes strides (3), scale strides
// (3), scale_type, B, H, M, T, D, bits, threads.
void kvpack_turbo_weighted_sum(const int64_t* m, void* const* p) {
  kvpack_turbo_weighted_sum_impl(static_cast<const float*>(p[0]), m, static_cast<const uint8_t*>(p[1]), m + 4,
                                 p[2], m + 7, (int)m[10], static_cast<const float*>(p[3]),
                                 static_cast<float*>(p[4]), m[11], m[12], (int)m[13], m[14], (int)m[15],
                                 (int)m[16], (int)m[17]);
}

}  // extern "C"
