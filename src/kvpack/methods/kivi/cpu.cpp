// KIVI's fused CPU kernels: key scores over per-channel groups, the value weighted sum over per-token codes
// (also QJL's values), and quantize-and-pack at flush, bit for bit as the reference (reference.py here).
//
// The inner loops (block_dot) read one byte row of packed codes at a time and accumulate in "bit-plane"
// order: 8 bytes widen to 8 lanes once, and each bit plane is one shift and mask; the element order is
// restored once per output block, not per code.
// Each code is dequantized once (fma(code, scale, zero), as the reference does) and then shared by all
// query rows. Factoring the zero point out (sum q (c s + z) = sum (q s) c + sum q z) saves that FMA but
// adds cancellation error beyond 2x the reference's, so it is not done.
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


inline int block_channels(int G) { return G % 32 == 0 ? 32 : (G % 16 == 0 ? 16 : 8); }

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


// q (B, H, M, D) float32 with strides q_s[4] (q_s[3] == 1); codes (B, H, N, D, G * bits / 8) uint8 with
// batch/head strides codes_s[2] and the rest contiguous; scale/zero (B, H, N, D) with batch/head strides
// scale_s[2], rest contiguous; out (B, H, M, N * G) float32 contiguous. G % 8 == 0.
void kivi_key_scores_impl(const float* q, const int64_t* q_s, const uint8_t* codes, const int64_t* codes_s,
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
void value_weighted_sum_impl(const float* w, const int64_t* w_s, const uint8_t* codes, const int64_t* codes_s,
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

// Values: x (B, H, T, D) of x_type with strides x_s[4] (x_s[3] == 1) -> codes (B, H, T, ceil(D * bits / 8))
// uint8, scale/zero (B, H, T, D / G) of scale_type, all contiguous. Groups of G consecutive channels.
// Returns 0, or 1 when a scale or zero overflows the scale type.
int quantize_tokens_impl(const void* x, int x_type, const int64_t* x_s, int64_t B, int64_t H, int64_t T, int D,
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
int quantize_key_groups_impl(const void* x, int x_type, const int64_t* x_s, int64_t B, int64_t H, int64_t N,
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


}  // namespace
}  // namespace kvpack

using namespace kvpack;

// Argument structs: mirrored field by field by the ctypes.Structure classes in cpu.py.
struct KiviKeyScoresArgs {
  const float* query;
  int64_t query_strides[4];
  const uint8_t* codes;
  int64_t codes_strides[2];
  const void* scale;
  const void* zero;
  int64_t scale_strides[2];
  int64_t scale_type, batch, heads, rows, groups, head_dim, group, bits, threads;
  float* out;
};

struct ValueWeightedSumArgs {
  const float* weights;
  int64_t weights_strides[4];
  const uint8_t* codes;
  int64_t codes_strides[3];
  const void* scale;
  const void* zero;
  int64_t scale_strides[3];
  int64_t scale_type, batch, heads, rows, tokens, head_dim, group, bits, threads;
  float* out;
};

struct QuantizeArgs {  // tokens: T for per-token values, N (groups) for key groups
  const void* x;
  int64_t x_type;
  int64_t x_strides[4];
  int64_t batch, heads, tokens, head_dim, group, bits, scale_type, threads;
  uint8_t* codes;
  void* scale;
  void* zero;
};

extern "C" {

int kvpack_kivi_key_scores(const KiviKeyScoresArgs* a) {
  kivi_key_scores_impl(a->query, a->query_strides, a->codes, a->codes_strides, a->scale, a->zero, a->scale_strides,
                       (int)a->scale_type, a->out, a->batch, a->heads, (int)a->rows, a->groups, (int)a->head_dim,
                       (int)a->group, (int)a->bits, (int)a->threads);
  return 0;
}

int kvpack_value_weighted_sum(const ValueWeightedSumArgs* a) {
  value_weighted_sum_impl(a->weights, a->weights_strides, a->codes, a->codes_strides, a->scale, a->zero,
                          a->scale_strides, (int)a->scale_type, a->out, a->batch, a->heads, (int)a->rows, a->tokens,
                          (int)a->head_dim, (int)a->group, (int)a->bits, (int)a->threads);
  return 0;
}

// Returns 0, or 1 when a scale or zero overflows the scale type or the input holds a NaN.
int kvpack_quantize_tokens(const QuantizeArgs* a) {
  return quantize_tokens_impl(a->x, (int)a->x_type, a->x_strides, a->batch, a->heads, a->tokens, (int)a->head_dim,
                              (int)a->group, (int)a->bits, a->codes, a->scale, a->zero, (int)a->scale_type,
                              (int)a->threads);
}

int kvpack_quantize_key_groups(const QuantizeArgs* a) {
  return quantize_key_groups_impl(a->x, (int)a->x_type, a->x_strides, a->batch, a->heads, a->tokens,
                                  (int)a->head_dim, (int)a->group, (int)a->bits, a->codes, a->scale, a->zero,
                                  (int)a->scale_type, (int)a->threads);
}

}  // extern "C"
