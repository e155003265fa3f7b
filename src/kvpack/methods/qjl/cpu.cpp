// QJL's fused CPU kernels: score estimates over sketched key groups, the fused decode step (with KIVI's
// affine values, kernels/csrc/affine.h), and sign packing at flush.
#include "affine.h"
#include "decode.h"

namespace kvpack {
namespace {

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
  // 16 partial sums, as the AVX2 path keeps (2 vectors of 8): one running sum over all m terms adds rounding
  // error growing with m (5x the reference's at m = 256).
  for (int r = 0; r < ROWS; ++r) {
    float partial[16] = {};
    for (int p = 0; p < nbits; ++p) partial[p % 16] += (bytes[p / 8] >> (p % 8)) & 1 ? x[r * xs + p] : -x[r * xs + p];
    float sum = 0.f;
    for (int i = 0; i < 16; ++i) sum += partial[i];
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



// All M rows of one (batch, head), groups [0, n): the pointers already at that (batch, head) and first group.
inline void qjl_item(const float* q, int64_t q_row, int M, const float* sq, const float* sketch_t, int m, int m_o,
                     int k, const uint8_t* idx, const uint8_t* signs, const void* norms, const uint8_t* osigns,
                     const void* onorms, int norm_type, float* out, int64_t out_row, int64_t n, int G, int D,
                     int* bad) {
  int r = 0;
  for (; r + 4 <= M; r += 4)
    qjl_rows<4>(q + r * q_row, q_row, sq + r * m, m, sketch_t, m, m_o, k, idx, signs, norms, osigns, onorms, norm_type,
                out + r * out_row, out_row, 0, n, G, D, bad);
  const float *qr = q + r * q_row, *sqr = sq + r * m;
  float* o = out + r * out_row;
  switch (M - r) {
    case 3: qjl_rows<3>(qr, q_row, sqr, m, sketch_t, m, m_o, k, idx, signs, norms, osigns, onorms, norm_type, o, out_row,
                        0, n, G, D, bad); break;
    case 2: qjl_rows<2>(qr, q_row, sqr, m, sketch_t, m, m_o, k, idx, signs, norms, osigns, onorms, norm_type, o, out_row,
                        0, n, G, D, bad); break;
    case 1: qjl_rows<1>(qr, q_row, sqr, m, sketch_t, m, m_o, k, idx, signs, norms, osigns, onorms, norm_type, o, out_row,
                        0, n, G, D, bad); break;
    default: break;
  }
}

// The sketched key groups of one layer: outlier_idx (B, H, N, k) uint8, signs (B, H, N, G, m / 8), norms
// (B, H, N, G), outlier_signs (B, H, N, G, m_o / 8), outlier_norms (B, H, N, G): batch/head strides in idx_s,
// signs_s, norms_s, osigns_s, onorms_s (2 each), the rest contiguous; absent parts null (k = 0, m_o = 0).
// sq = S q (B, H, M, m) float32 contiguous; sketch_t (D, m) contiguous. Also the decode Keys policy.
struct QjlKeys {
  const float* sq;
  const float* sketch_t;
  const uint8_t* idx;
  const int64_t* idx_s;
  const uint8_t* signs;
  const int64_t* signs_s;
  const void* norms;
  const int64_t* norms_s;
  const uint8_t* osigns;
  const int64_t* osigns_s;
  const void* onorms;
  const int64_t* onorms_s;
  int norm_type;
  int64_t H;
  int rows, D, G, m, m_o, k;
  int* bad;  // set when an outlier index is >= D
  int64_t unit;

  struct Scratch {
    Scratch(const QjlKeys&, int, int) {}
  };

  // Scores of groups [t0 / G, t1 / G) of (b, h) into out (M, t1 - t0).
  void scores(int64_t b, int64_t h, const float* q, int64_t q_row, int M, int64_t t0, int64_t t1, float* out,
              int64_t out_row, Scratch&) const {
    const int64_t n0 = t0 / G, n1 = t1 / G;
    const int esize = norm_type == kF32 ? 4 : 2;
    const uint8_t* ib = idx ? idx + b * idx_s[0] + h * idx_s[1] + n0 * k : nullptr;
    const uint8_t* sb = signs + b * signs_s[0] + h * signs_s[1] + n0 * G * (m / 8);
    const void* nb = static_cast<const char*>(norms) + (b * norms_s[0] + h * norms_s[1] + n0 * G) * esize;
    const uint8_t* ob = osigns ? osigns + b * osigns_s[0] + h * osigns_s[1] + n0 * G * (m_o / 8) : nullptr;
    const void* onb =
        onorms ? static_cast<const char*>(onorms) + (b * onorms_s[0] + h * onorms_s[1] + n0 * G) * esize : nullptr;
    int flagged = 0;
    qjl_item(q, q_row, M, sq + (b * H + h) * rows * m, sketch_t, m, m_o, k, ib, sb, nb, ob, onb, norm_type, out,
             out_row, n1 - n0, G, D, &flagged);
    if (flagged) {
#pragma omp atomic write
      *bad = 1;
    }
  }
};

// q (B, H, M, D) float32 with strides q_s[4] (q_s[3] == 1); keys as QjlKeys; out (B, H, M, N * G) float32
// contiguous. Returns 1 when an outlier index is >= D, else 0.
int qjl_key_scores_impl(const float* q, const int64_t* q_s, const QjlKeys& keys, float* out, int64_t B, int M,
                        int64_t N, int threads) {
  const int G = keys.G;
  const int64_t per_block = std::max<int64_t>(1, 512 / G);
  const int64_t blocks = (N + per_block - 1) / per_block;
  const int64_t items = B * keys.H * blocks;
  const int64_t out_row = N * G;
  const double work = (double)B * keys.H * M * N * G * (keys.m + keys.m_o) / 8;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work > 2e5)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t bh = it / blocks, blk = it % blocks, b = bh / keys.H, h = bh % keys.H;
    const int64_t n0 = blk * per_block, n1 = std::min(N, n0 + per_block);
    QjlKeys::Scratch scratch(keys, M, keys.D);
    keys.scores(b, h, q + b * q_s[0] + h * q_s[1], q_s[2], M, n0 * G, n1 * G, out + bh * M * out_row + n0 * G,
                out_row, scratch);
  }
  return *keys.bad;
}

// Sign bits: x (rows, m) float32 with row stride x_row (unit stride inside a row) -> out (rows, ceil(m / 8))
// uint8 contiguous, bit p % 8 of byte p / 8 set iff x[p] > 0 (as pack_bits((x > 0).to(uint8), 1)).
void pack_signs_impl(const float* x, int64_t x_row, int64_t rows, int m, uint8_t* out, int threads) {
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


}  // namespace
}  // namespace kvpack

using namespace kvpack;

// Argument structs: mirrored field by field by the ctypes.Structure classes in cpu.py. Absent optional
// inputs (no outliers: k = 0; no outlier sketch: m_o = 0) are null pointers with strides 0.
struct QJLKeyRowArgs {  // the sketched key rows both entry points read (QjlKeys)
  const float* sketched;  // S q, (B, H, M, m) contiguous
  const float* sketch_t;  // S^T, (D, m) contiguous
  const uint8_t* outlier_idx;
  int64_t outlier_idx_strides[2];
  const uint8_t* signs;
  int64_t signs_strides[2];
  const void* norms;
  int64_t norms_strides[2];
  const uint8_t* outlier_signs;
  int64_t outlier_signs_strides[2];
  const void* outlier_norms;
  int64_t outlier_norms_strides[2];
};

struct QJLKeyScoresArgs {
  const float* query;
  int64_t query_strides[4];
  QJLKeyRowArgs keys;
  int64_t norm_type, batch, heads, rows, groups, head_dim, group, sketch_dim, outlier_sketch_dim, outliers, threads;
  float* out;
};

struct PackSignsArgs {
  const float* x;
  int64_t row_stride, rows, bits, threads;
  uint8_t* out;
};

struct QJLDecodeArgs {
  DecodeArgs common;
  QJLKeyRowArgs keys;
  int64_t norm_type, group, sketch_dim, outlier_sketch_dim, outliers;
  const uint8_t* value_codes;
  int64_t value_codes_strides[3];
  const void* value_scale;
  const void* value_zero;
  int64_t value_scale_strides[3];
  int64_t value_scale_type, value_bits;
};

static QjlKeys qjl_keys(const QJLKeyRowArgs& k, int64_t norm_type, int64_t heads, int64_t rows, int64_t head_dim,
                        int64_t group, int64_t m, int64_t m_o, int64_t outliers, int* bad) {
  return QjlKeys{k.sketched, k.sketch_t, k.outlier_idx, k.outlier_idx_strides, k.signs, k.signs_strides, k.norms,
                 k.norms_strides, k.outlier_signs, k.outlier_signs_strides, k.outlier_norms, k.outlier_norms_strides,
                 (int)norm_type, heads, (int)rows, (int)head_dim, (int)group, (int)m, (int)m_o, (int)outliers, bad,
                 group};
}

extern "C" {

// Returns 1 when an outlier index is >= D (those channels read as channel 0), else 0.
int kvpack_qjl_key_scores(const QJLKeyScoresArgs* a) {
  int bad = 0;
  const QjlKeys keys = qjl_keys(a->keys, a->norm_type, a->heads, a->rows, a->head_dim, a->group, a->sketch_dim,
                                a->outlier_sketch_dim, a->outliers, &bad);
  return qjl_key_scores_impl(a->query, a->query_strides, keys, a->out, a->batch, (int)a->rows, a->groups,
                             (int)a->threads);
}

// Returns 1 when an outlier index is >= D (those channels read as channel 0), else 0.
int kvpack_qjl_decode(const QJLDecodeArgs* a) {
  int bad = 0;
  const DecodeArgs& c = a->common;
  const int D = (int)c.head_dim, G = (int)a->group;
  const QjlKeys keys = qjl_keys(a->keys, a->norm_type, c.heads, c.rows, c.head_dim, a->group, a->sketch_dim,
                                a->outlier_sketch_dim, a->outliers, &bad);
  const AffineValues values(a->value_codes, a->value_codes_strides, a->value_scale, a->value_zero,
                            a->value_scale_strides, (int)a->value_scale_type, D, G, (int)a->value_bits);
  decode_attention(c, keys, values);
  return bad;
}

int kvpack_pack_signs(const PackSignsArgs* a) {
  pack_signs_impl(a->x, a->row_stride, a->rows, (int)a->bits, a->out, (int)a->threads);
  return 0;
}

}  // extern "C"
