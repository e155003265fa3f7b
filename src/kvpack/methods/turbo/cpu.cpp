// Turbo's (rotated codebook) fused CPU kernels: key scores by per-query lookup tables over packed bytes,
// and the value weighted sum with codebook permutes, both in the rotated basis, and the fused decode step.
#include "decode.h"

namespace kvpack {
namespace {

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

#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512: 16 bytes of a token widen to 16 lanes; bit plane s is one shift and mask, the lookup one permute
// (up to 16 codebook entries in a register; 256 entries: a gather); all planes' accumulators stay in the
// 32 registers. Lane l of plane s in byte vector v is channel (16 v + l) * PER + s.
template <int BITS, int ROWS>
void turbo_value_512(const TurboValueArgs& a) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  float padded[16] = {};
  for (int c = 0; c < (BITS == 8 ? 16 : 1 << BITS); ++c) padded[c] = a.codebook[c];
  const __m512 cb = _mm512_loadu_ps(padded);
  const __m512i mask = _mm512_set1_epi32(MASK);
  const int64_t count = a.count, code_t = a.code_t, ws_row = a.ws_row;
  for (int v = 0; v < a.nb / 16; ++v) {
    __m512 acc[ROWS][PER];
    for (int r = 0; r < ROWS; ++r)
      for (int s = 0; s < PER; ++s) acc[r][s] = _mm512_setzero_ps();
    const uint8_t* bytes = a.codes + 16 * v;
    for (int64_t i = 0; i < count; ++i, bytes += code_t) {
      const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
      __m512 w[ROWS];
      for (int r = 0; r < ROWS; ++r) w[r] = _mm512_set1_ps(a.ws[r * ws_row + i]);
      for (int s = 0; s < PER; ++s) {
        const __m512i code = BITS == 8 ? x : _mm512_and_si512(_mm512_srli_epi32(x, s * BITS), mask);
        const __m512 value = BITS == 8 ? _mm512_i32gather_ps(code, a.codebook, 4) : _mm512_permutexvar_ps(code, cb);
        for (int r = 0; r < ROWS; ++r) acc[r][s] = _mm512_fmadd_ps(w[r], value, acc[r][s]);
      }
    }
    alignas(64) float lanes[16];
    for (int r = 0; r < ROWS; ++r)
      for (int s = 0; s < PER; ++s) {
        _mm512_store_ps(lanes, acc[r][s]);
        for (int l = 0; l < 16; ++l) a.out[r * a.out_row + (16 * v + l) * PER + s] = lanes[l];
      }
  }
}
#endif

template <int BITS, int ROWS>
void turbo_value_rows(const TurboValueArgs& a) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (a.nb % 16 == 0) return turbo_value_512<BITS, ROWS>(a);
#endif
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


// Turbo key scores: q (B, H, M, D) float32 rotated queries with strides q_s[4] (q_s[3] == 1); codes
// (B, H, T, D * bits / 8) uint8 with strides codes_s[3] (last contiguous); scale (B, H, T) with strides
// scale_s[3]; codebook (2^bits) float32; out (B, H, M, T) float32 contiguous. D * bits % 8 == 0.
void turbo_key_scores_impl(const float* q, const int64_t* q_s, const uint8_t* codes,
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
void turbo_weighted_sum_impl(const float* w, const int64_t* w_s, const uint8_t* codes,
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


// Turbo's decode policies (decode.h). Keys: codes (B, H, T, D * bits / 8) with strides codes_s[3] (last
// contiguous), scale (B, H, T) with strides scale_s[3]; each item rotates its query rows once (q R^T,
// rotation (D, D) row-major) and scores them by the lookup tables above.
struct TurboRows {
  const uint8_t* codes;
  const int64_t* codes_s;
  const void* scale;
  const int64_t* scale_s;
  int scale_type;
  const float* codebook;
  const float* rotation;
  int D, bits;
};

struct TurboKeys : TurboRows {
  int64_t unit = 1;

  struct Scratch {
    std::vector<float> rotated;     // (M, D)
    std::unique_ptr<float[]> table;  // the largest row chunk's table (8 rows)
    Scratch(const TurboKeys& keys, int M, int D)
        : rotated((size_t)M * D), table(new float[(size_t)(D * keys.bits / 8) * 256 * 8]) {}
  };

  void scores(int64_t b, int64_t h, const float* q, int64_t q_row, int M, int64_t t0, int64_t t1, float* out,
              int64_t out_row, Scratch& scratch) const {
    float* qr = scratch.rotated.data();
    for (int r = 0; r < M; ++r)
      for (int d = 0; d < D; ++d) qr[r * D + d] = dot(rotation + (int64_t)d * D, q + r * q_row, D);
    const int esize = scale_type == kF32 ? 4 : 2;
    const uint8_t* cb = codes + b * codes_s[0] + h * codes_s[1] + t0 * codes_s[2];
    const char* sc = static_cast<const char*>(scale) + (b * scale_s[0] + h * scale_s[1] + t0 * scale_s[2]) * esize;
    const int wide = M > 4 ? (M - 4 + 7) / 8 : 0;  // row chunks as in turbo_key_scores_impl
    for (int r0 = 0, chunk = 0; r0 < M; r0 += chunk < wide ? 8 : 4, ++chunk) {
      const int rows = std::min(M - r0, chunk < wide ? 8 : 4);
      const auto chunk_scores = chunk < wide ? turbo_key_chunk<8> : turbo_key_chunk<4>;
      chunk_scores(qr + r0 * D, D, rows, D, bits, codebook, cb, codes_s[2], sc, scale_s[2], scale_type, 0, t1 - t0,
                   out + r0 * out_row, out_row, scratch.table.get());
    }
  }
};

// Values: codes (B, H, T, D * bits / 8), scale (B, H, T) as for keys. The packed part is summed in the
// rotated basis and rotated back once per row at the end (finish: out = packed R + fp).
struct TurboValues : TurboRows {
  static constexpr bool kRotated = true;

  struct Scratch {
    std::vector<float> ws, sums;  // folded weights w * s_t (M, segment); block sums (M, D)
    Scratch(const TurboValues&, int M, int D) : sums((size_t)M * D) {}
  };

  void accumulate(int64_t b, int64_t h, const float* w, int64_t w_row, int M, int64_t t0, int64_t t1, float* out,
                  int64_t out_row, Scratch& scratch) const {
    const int esize = scale_type == kF32 ? 4 : 2;
    const int64_t count = t1 - t0;
    const char* sc = static_cast<const char*>(scale) + (b * scale_s[0] + h * scale_s[1]) * esize;
    scratch.ws.resize((size_t)M * count);
    for (int64_t i = 0; i < count; ++i) {
      const float s = load_scale(sc, (t0 + i) * scale_s[2], scale_type);
      for (int r = 0; r < M; ++r) scratch.ws[r * count + i] = w[r * w_row + i] * s;
    }
    const TurboValueArgs args{count, codes + b * codes_s[0] + h * codes_s[1] + t0 * codes_s[2], codes_s[2],
                              D * bits / 8, codebook, scratch.ws.data(), count, scratch.sums.data(), D};
    switch (bits) {
      case 1: turbo_value_item<1>(args, M); break;
      case 2: turbo_value_item<2>(args, M); break;
      case 4: turbo_value_item<4>(args, M); break;
      default: turbo_value_item<8>(args, M); break;
    }
    const float* sums = scratch.sums.data();
    for (int r = 0; r < M; ++r)
      for (int d = 0; d < D; ++d) out[r * out_row + d] += sums[r * D + d];
  }

  void finish(const float* packed, const float* fp, int M, int D_, float* out) const {
    for (int r = 0; r < M; ++r) {
      float* o = out + (int64_t)r * D_;
      std::copy(fp + (int64_t)r * D_, fp + (int64_t)(r + 1) * D_, o);
      for (int d = 0; d < D_; ++d) {
        const float x = packed[r * D_ + d];
        const float* row = rotation + (int64_t)d * D_;
        for (int e = 0; e < D_; ++e) o[e] += x * row[e];
      }
    }
  }
};

}  // namespace
}  // namespace kvpack

using namespace kvpack;

// Mirrored field by field by the ctypes.Structure in cpu.py. rows_in: the rotated queries (key scores) or
// the attention weights (weighted sum); length: T for both.
struct TurboArgs {
  const float* rows_in;
  int64_t rows_strides[4];
  const uint8_t* codes;
  int64_t codes_strides[3];
  const void* scale;
  int64_t scale_strides[3];
  int64_t scale_type;
  const float* codebook;
  int64_t batch, heads, rows, tokens, head_dim, bits, threads;
  float* out;
};

struct TurboDecodeArgs {
  DecodeArgs common;
  const uint8_t* key_codes;
  int64_t key_codes_strides[3];
  const void* key_scale;
  int64_t key_scale_strides[3];
  const float* key_codebook;
  const float* key_rotation;
  const uint8_t* value_codes;
  int64_t value_codes_strides[3];
  const void* value_scale;
  int64_t value_scale_strides[3];
  const float* value_codebook;
  const float* value_rotation;
  int64_t scale_type, key_bits, value_bits;
};

extern "C" {

int kvpack_turbo_decode(const TurboDecodeArgs* a) {
  const int D = (int)a->common.head_dim, type = (int)a->scale_type;
  const TurboKeys keys{{a->key_codes, a->key_codes_strides, a->key_scale, a->key_scale_strides, type, a->key_codebook,
                        a->key_rotation, D, (int)a->key_bits}};
  const TurboValues values{{a->value_codes, a->value_codes_strides, a->value_scale, a->value_scale_strides, type,
                            a->value_codebook, a->value_rotation, D, (int)a->value_bits}};
  decode_attention(a->common, keys, values);
  return 0;
}

int kvpack_turbo_key_scores(const TurboArgs* a) {
  turbo_key_scores_impl(a->rows_in, a->rows_strides, a->codes, a->codes_strides, a->scale, a->scale_strides,
                        (int)a->scale_type, a->codebook, a->out, a->batch, a->heads, (int)a->rows, a->tokens,
                        (int)a->head_dim, (int)a->bits, (int)a->threads);
  return 0;
}

int kvpack_turbo_weighted_sum(const TurboArgs* a) {
  turbo_weighted_sum_impl(a->rows_in, a->rows_strides, a->codes, a->codes_strides, a->scale, a->scale_strides,
                          (int)a->scale_type, a->codebook, a->out, a->batch, a->heads, (int)a->rows, a->tokens,
                          (int)a->head_dim, (int)a->bits, (int)a->threads);
  return 0;
}

}  // extern "C"
