// Pieces every CPU kernel file uses: function multi-versioning, padding of the
// vector loops, chunked sums, and the row layout of a tensor.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define ENTMAX_CPU_AVX512_COMPRESS 1
#endif

namespace entmax_cuda {
namespace cpu {

// The hot loops, vectorised: compiled for AVX-512, AVX2 and baseline x86-64, the CPU
// picks at load time (GCC function multi-versioning). `flatten` inlines everything such a
// function calls (the shared math, the root finder), so all of it runs in the chosen ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENTMAX_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define ENTMAX_CPU_CLONES
#endif

// Sums over a row are vector float partial sums over chunks of kSumChunk entries (at
// most 16 terms per lane), flushed into double: float-speed loops, no per-entry
// conversion, and a row's rounding stays below 1 ulp.
constexpr int64_t kSumChunk = 256;

// The vector loops run over a multiple of kPad entries (padding that adds exactly 0):
// short rows then need no scalar remainder loop.
constexpr int64_t kPad = 16;
inline int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// Elements of row r of a tensor seen as (outer, n, inner) rows along the middle axis:
// x[row_base(r) + k * inner].
inline int64_t row_base(int64_t r, int64_t n, int64_t inner) { return (r / inner) * n * inner + r % inner; }

// Rows per parallel_for task: about 16k elements each.
inline int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// The positions k < n with row[k] > cut, in order, into out[0, count); returns count.
// Compaction is the per-row step of the short-row batches; the generic loop costs a few
// cycles per entry, AVX-512's compress-store a few per 16.
inline int64_t positions_above_generic(const float* row, int64_t n, float cut, int32_t* out) {
  int64_t c = 0;
  for (int64_t k = 0; k < n; ++k) {  // branch-free: one store per entry
    out[c] = static_cast<int32_t>(k);
    c += row[k] > cut;
  }
  return c;
}

#if defined(ENTMAX_CPU_AVX512_COMPRESS)
__attribute__((target("avx512f"))) inline int64_t positions_above_avx512(const float* row, int64_t n, float cut,
                                                                          int32_t* out) {
  const __m512 cut_v = _mm512_set1_ps(cut);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i k_v = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in_row = n - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(in_row, row + k);
    const __mmask16 above = _mm512_mask_cmp_ps_mask(in_row, v, cut_v, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_epi32(out + c, above, k_v);
    c += __builtin_popcount(above);
    k_v = _mm512_add_epi32(k_v, step);
  }
  return c;
}
#endif

inline int64_t positions_above(const float* row, int64_t n, float cut, int32_t* out) {
#if defined(ENTMAX_CPU_AVX512_COMPRESS)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return positions_above_avx512(row, n, cut, out);
#endif
  return positions_above_generic(row, n, cut, out);
}

}  // namespace cpu
}  // namespace entmax_cuda
