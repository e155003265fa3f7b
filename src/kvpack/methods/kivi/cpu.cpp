// KIVI's fused CPU kernels: key scores over per-channel groups, the value weighted sum over per-token codes
// (also QJL's values), the fused decode step, and quantize-and-pack at flush, bit for bit as the reference
// (reference.py here). The block dot product they share with QJL's values is in kernels/csrc/affine.h.
#include "affine.h"
#include "decode.h"

namespace kvpack {
namespace {

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

inline KeyItemFn key_fn(int bits, int ch) {
  switch (bits) {
    case 2: return pick_key_fn<2>(ch);
    case 4: return pick_key_fn<4>(ch);
    default: return pick_key_fn<8>(ch);
  }
}

// KIVI keys as a decode_attention Keys policy (decode.h): codes (B, H, N, D, G * bits / 8) with batch/head
// strides codes_s[2], the rest contiguous; scale/zero (B, H, N, D) with batch/head strides scale_s[2].
struct KiviKeys {
  const uint8_t* codes;
  const int64_t* codes_s;
  const void* scale;
  const void* zero;
  const int64_t* scale_s;
  int scale_type, D, G, group_bytes;
  KeyItemFn fn;
  int64_t unit;

  struct Scratch {
    Scratch(const KiviKeys&, int, int) {}
  };

  void scores(int64_t b, int64_t h, const float* q, int64_t q_row, int M, int64_t t0, int64_t t1, float* out,
              int64_t out_row, Scratch&) const {
    const int64_t n0 = t0 / G, n1 = t1 / G;
    const int esize = scale_type == kF32 ? 4 : 2;
    const int64_t offset = (b * scale_s[0] + h * scale_s[1] + n0 * D) * esize;
    fn(q, q_row, M, codes + b * codes_s[0] + h * codes_s[1] + n0 * D * group_bytes,
       static_cast<const char*>(scale) + offset, static_cast<const char*>(zero) + offset, scale_type, out, out_row,
       0, n1 - n0, D, G);
  }
};

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
// uint8 with batch/head/token strides codes_s[3], scale/zero (B, H, T, D / G) of scale_type with strides
// scale_s[3] (both last axes contiguous). Groups of G consecutive channels.
// Returns 0, or 1 when a scale or zero overflows the scale type.
int quantize_tokens_impl(const void* x, int x_type, const int64_t* x_s, int64_t B, int64_t H, int64_t T, int D,
                         int G, int bits, uint8_t* codes, const int64_t* codes_s, void* scale, void* zero,
                         const int64_t* scale_s, int scale_type, int threads) {
  const int64_t rows = B * H * T;
  const int groups = D / G;
  int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad) if (threads > 1 && rows * D > 1 << 16)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / (H * T), h = (row / T) % H, t = row % T;
    const int64_t base = b * x_s[0] + h * x_s[1] + t * x_s[2];
    const int64_t sz = b * scale_s[0] + h * scale_s[1] + t * scale_s[2];
    std::vector<float> buf(D);
    std::vector<uint8_t> row_codes(D);
    for (int d = 0; d < D; ++d) buf[d] = load_scale(x, base + d, x_type);
    for (int g = 0; g < groups; ++g)
      bad |= !quantize_group(buf.data() + g * G, G, 1, bits, scale, zero, sz + g, scale_type, row_codes.data() + g * G);
    pack_codes(row_codes.data(), D, bits, codes + b * codes_s[0] + h * codes_s[1] + t * codes_s[2]);
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

struct KiviDecodeArgs {
  DecodeArgs common;
  const uint8_t* key_codes;
  int64_t key_codes_strides[2];
  const void* key_scale;
  const void* key_zero;
  int64_t key_scale_strides[2];
  const uint8_t* value_codes;
  int64_t value_codes_strides[3];
  const void* value_scale;
  const void* value_zero;
  int64_t value_scale_strides[3];
  int64_t scale_type, key_bits, value_bits, group;
};

struct QuantizeIntoArgs {
  const void* x;
  int64_t x_type;
  int64_t x_strides[4];
  int64_t batch, heads, tokens, head_dim, group, bits, scale_type, threads;
  uint8_t* codes;
  int64_t codes_strides[3];
  void* scale;
  void* zero;
  int64_t scale_strides[3];
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

int kvpack_kivi_decode(const KiviDecodeArgs* a) {
  const int D = (int)a->common.head_dim, G = (int)a->group, type = (int)a->scale_type;
  const int key_bytes = G * (int)a->key_bits / 8;
  const KiviKeys keys{a->key_codes, a->key_codes_strides, a->key_scale, a->key_zero, a->key_scale_strides, type, D, G,
                      key_bytes, key_fn((int)a->key_bits, block_channels(G)), G};
  const AffineValues values(a->value_codes, a->value_codes_strides, a->value_scale, a->value_zero,
                            a->value_scale_strides, type, D, G, (int)a->value_bits);
  decode_attention(a->common, keys, values);
  return 0;
}

// Returns 0, or 1 when a scale or zero overflows the scale type or the input holds a NaN.
int kvpack_quantize_tokens(const QuantizeArgs* a) {
  const int64_t T = a->tokens, row_bytes = (a->head_dim * a->bits + 7) / 8, groups = a->head_dim / a->group;
  const int64_t codes_s[3] = {a->heads * T * row_bytes, T * row_bytes, row_bytes};  // contiguous outputs
  const int64_t scale_s[3] = {a->heads * T * groups, T * groups, groups};
  return quantize_tokens_impl(a->x, (int)a->x_type, a->x_strides, a->batch, a->heads, T, (int)a->head_dim,
                              (int)a->group, (int)a->bits, a->codes, codes_s, a->scale, a->zero, scale_s,
                              (int)a->scale_type, (int)a->threads);
}

// The same into given outputs (the store's row buffers at their free slots), with strides.
int kvpack_quantize_tokens_into(const QuantizeIntoArgs* a) {
  return quantize_tokens_impl(a->x, (int)a->x_type, a->x_strides, a->batch, a->heads, a->tokens, (int)a->head_dim,
                              (int)a->group, (int)a->bits, a->codes, a->codes_strides, a->scale, a->zero,
                              a->scale_strides, (int)a->scale_type, (int)a->threads);
}

int kvpack_quantize_key_groups(const QuantizeArgs* a) {
  return quantize_key_groups_impl(a->x, (int)a->x_type, a->x_strides, a->batch, a->heads, a->tokens,
                                  (int)a->head_dim, (int)a->group, (int)a->bits, a->codes, a->scale, a->zero,
                                  (int)a->scale_type, (int)a->threads);
}

}  // extern "C"
