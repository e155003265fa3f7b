// The fused decode step shared by every method: one call per layer computes
//   out = softmax(scale * q.K^T + mask) V
// over the packed key rows, the fp key tokens that follow them (the block flushed by this step's append
// and the residual), the packed value tokens and the fp value window, with no intermediate tensors.
//
// A method supplies two policies:
//   Keys:   int64_t unit;                 // quantized key tokens come in rows of `unit` tokens
//           struct Scratch { Scratch(const Keys&, int M, int D); };
//           void scores(b, h, q, q_row, M, t0, t1, out, out_row, Scratch&) const;
//             // q.k of quantized tokens [t0, t1) (t0 a multiple of unit) into out (M, t1 - t0)
//   Values: static constexpr bool kRotated;  // the packed part's sum lives in another basis (turbo)
//           struct Scratch { Scratch(const Values&, int M, int D); };
//           void accumulate(b, h, w, w_row, M, t0, t1, out, out_row, Scratch&) const;
//             // out (M, D) += sum_{t in [t0, t1)} w[., t - t0] v_t over quantized tokens
//           void finish(packed, fp, M, D, out) const;   // kRotated only: out = rotate(packed) + fp
//
// Work split (flash-decoding): items are (batch, kv head, token segment). Each item scores its segment,
// takes the softmax numerator against its own running maximum and accumulates P.V; a second loop in the
// same parallel region merges the segments of each (batch, head) (rescaling by exp(max_s - max)), so one
// call is one OpenMP region however many threads run. Segments are used only when (batch, head) alone
// cannot give every thread work (B = 1, long contexts).
#pragma once

#include "kvpack.h"

namespace kvpack {
namespace {

// One side's full-precision tokens: up to three chunks read one after the other (the block flushed by this
// step, the residual or window, the attention sinks), each (B, H, length, D) with batch/head/token strides and
// a contiguous last axis; unused chunks have length 0.
constexpr int kFpChunks = 3;
struct FpChunk {
  const void* data;
  int64_t strides[3];
  int64_t length;
};
struct FpTokens {
  FpChunk chunk[kFpChunks];
  int64_t type;  // ScaleType: the model dtype
};

// The chunk holding a side's fp token `local` (counted over the chunks in order); `local` becomes its row there.
inline int fp_chunk(const FpTokens& side, int64_t& local) {
  int c = 0;
  while (c + 1 < kFpChunks && local >= side.chunk[c].length) local -= side.chunk[c++].length;
  return c;
}

// The arguments every method's decode entry point starts with (mirrored by kvpack.kernels.decode).
struct DecodeArgs {
  const float* query;  // (B, H, M, D) float32: the M query rows of each kv head; last axis contiguous
  int64_t query_strides[3];
  const float* mask;  // additive (B, H, M, T) float32 with strides (0 = broadcast), last axis contiguous; or null
  int64_t mask_strides[3];
  FpTokens keys, values;
  int64_t batch, heads, rows, head_dim;
  int64_t key_quantized, value_quantized, tokens;  // T = key_quantized + fp keys = value_quantized + fp values
  int64_t threads;
  double scale;
  float* out;  // (B, H, M, D) float32 contiguous
};

// Row t of an fp chunk as float32: a pointer into the chunk when it is float32, else converted into buf.
inline const float* fp_row(const FpTokens& side, int c, int64_t b, int64_t h, int64_t t, int D, float* buf) {
  const FpChunk& ch = side.chunk[c];
  const int64_t offset = b * ch.strides[0] + h * ch.strides[1] + t * ch.strides[2];
  if (side.type == kF32) return static_cast<const float*>(ch.data) + offset;
  const uint16_t* src = static_cast<const uint16_t*>(ch.data) + offset;
  int d = 0;
  if (side.type == kBF16) {
#if defined(__AVX2__)
    for (; d + 8 <= D; d += 8) {
      const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
      _mm256_storeu_ps(buf + d, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
    }
#endif
    for (; d < D; ++d) buf[d] = bf16_to_float(src[d]);
  } else {
#if defined(__F16C__) && defined(__AVX2__)
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
#endif
    for (; d < D; ++d) buf[d] = half_to_float(src[d]);
  }
  return buf;
}

inline float dot(const float* a, const float* b, int D) {
  int d = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  const __m256 s = _mm256_add_ps(acc0, acc1);
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  sum = _mm_cvtss_f32(half);
#endif
  for (; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) for 8 lanes, x <= 0 (the softmax numerator): 2^n * p(r), n = round(x log2 e), r = x - n ln 2 in
// two parts, p a degree-6 polynomial (Cephes' coefficients; relative error ~2 ulp). Lanes below -87.3
// (including -inf, masked tokens) give exactly 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

// row[j] = exp(row[j] - max) for j < n; returns their sum.
inline float exp_shifted_sum(float* row, int64_t n, float max) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 m = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), m));
    _mm256_storeu_ps(row + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (int l = 0; l < 8; ++l) sum += lanes[l];
#endif
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - max);
    sum += row[j];
  }
  return sum;
}

// row[j] = row[j] * scale (+ mask[j]) for j < n; returns the maximum (-inf when every entry is), or NaN
// when an entry is NaN or +inf (torch's softmax then gives NaN for the whole row).
inline float scale_mask_max(float* row, const float* mask, int64_t n, float scale) {
  int64_t j = 0;
  float mx = -INFINITY;
  bool poisoned = false;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 s = _mm256_set1_ps(scale);
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;  // two chains: max has a 4-cycle latency
  __m256 nan = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(row + j), s), b = _mm256_mul_ps(_mm256_loadu_ps(row + j + 8), s);
    if (mask) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(mask + j));
      b = _mm256_add_ps(b, _mm256_loadu_ps(mask + j + 8));
    }
    _mm256_storeu_ps(row + j, a);
    _mm256_storeu_ps(row + j + 8, b);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  for (int l = 0; l < 8; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
  poisoned = _mm256_movemask_ps(nan) != 0;
#endif
  for (; j < n; ++j) {
    const float v = mask ? row[j] * scale + mask[j] : row[j] * scale;
    row[j] = v;
    poisoned |= v != v;
    mx = v > mx ? v : mx;
  }
  return poisoned || mx == INFINITY ? NAN : mx;
}

// o[d] += w * v[d], d < D.
inline void axpy(float w, const float* v, float* o, int D) {
  for (int d = 0; d < D; ++d) o[d] += w * v[d];
}

// Segments per (batch, head): 1 unless B * H items cannot give every thread ~4 items; then enough for that,
// never shorter than 512 tokens.
inline int64_t decode_segments(int64_t bh, int threads, int64_t T) {
  if (threads <= 1 || bh >= 4 * threads) return 1;
  return std::max<int64_t>(1, std::min<int64_t>((4 * threads + bh - 1) / bh, T / 512));
}

template <class Keys, class Values>
void decode_attention(const DecodeArgs& a, const Keys& keys, const Values& values) {
  const int64_t B = a.batch, H = a.heads, T = a.tokens, KQ = a.key_quantized, VQ = a.value_quantized;
  const int M = (int)a.rows, D = (int)a.head_dim, threads = (int)a.threads;
  const float scale = (float)a.scale;
  const int64_t unit = std::max<int64_t>(1, keys.unit);
  int64_t segments = decode_segments(B * H, threads, T);
  int64_t seg_len = (T + segments - 1) / segments;
  seg_len = (seg_len + unit - 1) / unit * unit;  // segment starts stay on key-row boundaries
  segments = (T + seg_len - 1) / seg_len;
  constexpr int kAcc = Values::kRotated ? 2 : 1;  // packed and fp sums kept apart when their bases differ
  const int64_t item_size = (int64_t)M * (2 + kAcc * D);  // max (M), sum (M), sums (kAcc, M, D)
  const int64_t items = B * H * segments;
  std::vector<float> partial((size_t)(items * item_size));
  const bool parallel = threads > 1 && (double)B * H * M * T * D > 2e5;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> scores((size_t)M * seg_len), buf(D);
    typename Keys::Scratch key_scratch(keys, M, D);
    typename Values::Scratch value_scratch(values, M, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t bh = it / segments, seg = it % segments, b = bh / H, h = bh % H;
      const int64_t t0 = seg * seg_len, t1 = std::min(T, t0 + seg_len), n = t1 - t0;
      const float* q = a.query + b * a.query_strides[0] + h * a.query_strides[1];
      const int64_t q_row = a.query_strides[2];
      float* part = partial.data() + it * item_size;
      float *row_max = part, *row_sum = part + M, *sums = part + 2 * M;
      float* s = scores.data();  // (M, n)
      // scores: quantized keys, then the fp chunks
      const int64_t kq1 = std::min(t1, KQ);
      if (t0 < kq1) keys.scores(b, h, q, q_row, M, t0, kq1, s, n, key_scratch);
      for (int64_t t = std::max(t0, KQ); t < t1; ++t) {
        int64_t local = t - KQ;
        const int c = fp_chunk(a.keys, local);
        const float* k = fp_row(a.keys, c, b, h, local, D, buf.data());
        for (int r = 0; r < M; ++r) s[r * n + t - t0] = dot(q + r * q_row, k, D);
      }
      // softmax numerators against this segment's maximum
      for (int r = 0; r < M; ++r) {
        float* row = s + r * n;
        const float* mrow = a.mask ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] + r * a.mask_strides[2] + t0
                                   : nullptr;
        const float mx = scale_mask_max(row, mrow, n, scale);
        row_max[r] = mx;
        if (mx == -INFINITY || mx != mx) {  // nothing to attend to in this segment, or a poisoned row (NaN)
          std::fill(row, row + n, 0.f);
          row_sum[r] = 0.f;
        } else {
          row_sum[r] = exp_shifted_sum(row, n, mx);
        }
      }
      std::fill(sums, sums + (int64_t)kAcc * M * D, 0.f);
      const int64_t vq1 = std::min(t1, VQ);
      if (t0 < vq1) values.accumulate(b, h, s, n, M, t0, vq1, sums, D, value_scratch);
      float* fp_sums = sums + (kAcc - 1) * M * D;
      for (int64_t t = std::max(t0, VQ); t < t1; ++t) {
        int64_t local = t - VQ;
        const int c = fp_chunk(a.values, local);
        const float* v = fp_row(a.values, c, b, h, local, D, buf.data());
        for (int r = 0; r < M; ++r) axpy(s[r * n + t - t0], v, fp_sums + r * D, D);
      }
    }
    // merge the segments of each (batch, head): rescale to the common maximum, normalize
    std::vector<float> merged((size_t)kAcc * M * D);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const float* first = partial.data() + bh * segments * item_size;
      float* out = a.out + bh * M * D;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int r = 0; r < M; ++r) {
        float mx = -INFINITY;
        bool poisoned = false;
        for (int64_t g = 0; g < segments; ++g) {
          const float m = first[g * item_size + r];
          poisoned |= m != m;
          mx = m > mx ? m : mx;
        }
        if (poisoned) {  // as torch's softmax: NaN everywhere; with a mask given, nan_to_num makes that 0
          for (int k = 0; k < kAcc; ++k)
            std::fill_n(merged.data() + ((int64_t)k * M + r) * D, D, a.mask ? 0.f : NAN);
          continue;
        }
        float total = 0.f;
        for (int64_t g = 0; g < segments; ++g) {
          const float* part = first + g * item_size;
          if (part[r] == -INFINITY) continue;
          const float w = segments == 1 ? 1.f : std::exp(part[r] - mx);
          total += w * part[M + r];
          for (int k = 0; k < kAcc; ++k) {
            const float* src = part + 2 * M + ((int64_t)k * M + r) * D;
            float* dst = merged.data() + ((int64_t)k * M + r) * D;
            for (int d = 0; d < D; ++d) dst[d] += w * src[d];
          }
        }
        // A row with nothing to attend to is zero under a mask; without one, every score was -inf (an
        // overflow): NaN, as torch's softmax gives.
        const float inv = total > 0.f ? 1.f / total : (a.mask ? 0.f : NAN);
        for (int k = 0; k < kAcc; ++k)
          for (int d = 0; d < D; ++d) merged[((int64_t)k * M + r) * D + d] *= inv;
      }
      if constexpr (Values::kRotated)
        values.finish(merged.data(), merged.data() + (int64_t)M * D, M, D, out);
      else
        std::copy(merged.begin(), merged.end(), out);
    }
  }
}

}  // namespace
}  // namespace kvpack
