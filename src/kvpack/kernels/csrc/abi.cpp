// The library's ABI version (see kvpack.h): checked by kvpack/kernels/native.py after loading; and the
// store's checked token copy, which every method's append uses.
#include "kvpack.h"

namespace kvpack {
namespace {

// One (B, H, T, D) tensor of a float type, with strides (elements).
struct Tokens {
  const void* data;
  int64_t strides[4];
};

inline bool finite_bits(const void* base, int64_t i, int type) {
  if (type == kF32) {
    uint32_t u;
    std::memcpy(&u, static_cast<const float*>(base) + i, 4);
    return (u & 0x7f800000u) != 0x7f800000u;
  }
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return type == kF16 ? (h & 0x7c00u) != 0x7c00u : (h & 0x7f80u) != 0x7f80u;
}

int64_t count_nonfinite(const Tokens& x, int64_t B, int64_t H, int64_t T, int64_t D, int type) {
  int64_t bad = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = b * x.strides[0] + h * x.strides[1] + t * x.strides[2];
        for (int64_t d = 0; d < D; ++d) bad += !finite_bits(x.data, row + d * x.strides[3], type);
      }
  return bad;
}

void copy_tokens(const Tokens& src, void* dst, const int64_t* dst_s, int64_t B, int64_t H, int64_t T, int64_t D,
                 int esize) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        char* out = static_cast<char*>(dst) + (b * dst_s[0] + h * dst_s[1] + t * dst_s[2]) * esize;
        const char* in = static_cast<const char*>(src.data) + (b * src.strides[0] + h * src.strides[1] + t * src.strides[2]) * esize;
        if (src.strides[3] == 1) {
          std::memcpy(out, in, (size_t)(D * esize));
        } else {
          for (int64_t d = 0; d < D; ++d) std::memcpy(out + d * esize, in + d * src.strides[3] * esize, (size_t)esize);
        }
      }
}

}  // namespace
}  // namespace kvpack

using namespace kvpack;

// Keys and values (B, H, T, D), one float type, into slots of the fp buffers (last axis contiguous there).
struct AppendTokensArgs {
  Tokens keys, values;
  void* key_dst;
  int64_t key_dst_strides[3];
  void* value_dst;
  int64_t value_dst_strides[3];
  int64_t batch, heads, tokens, head_dim, type, check_finite;
  int64_t* bad;  // out: non-finite values in keys, in values
};

extern "C" {

int kvpack_abi_version() { return KVPACK_ABI_VERSION; }

// Copies both sides, or nothing when check_finite and either holds a NaN/Inf (their counts in bad[0..1]).
int kvpack_append_tokens(const AppendTokensArgs* a) {
  const int type = (int)a->type;
  if (a->check_finite) {
    a->bad[0] = count_nonfinite(a->keys, a->batch, a->heads, a->tokens, a->head_dim, type);
    a->bad[1] = count_nonfinite(a->values, a->batch, a->heads, a->tokens, a->head_dim, type);
    if (a->bad[0] || a->bad[1]) return 1;
  }
  const int esize = type == kF32 ? 4 : 2;
  copy_tokens(a->keys, a->key_dst, a->key_dst_strides, a->batch, a->heads, a->tokens, a->head_dim, esize);
  copy_tokens(a->values, a->value_dst, a->value_dst_strides, a->batch, a->heads, a->tokens, a->head_dim, esize);
  return 0;
}

}  // extern "C"
