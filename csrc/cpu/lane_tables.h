// Short rows as [entry][lane] tables, one row per SIMD lane, and back. The batches of
// forward_rows.h and backward_rows.h keep each row's selected entries (the forward's
// candidates, the backward's support) compacted in a column of such a table, so that
// every step of the root finding is a vertical vector operation over kBatchLanes rows.
// With AVX-512 a row is loaded in 16-entry chunks, compacted with compress, staged row by
// row and turned into columns by 16 x 16 register transposes; the way back is a transpose
// and an expand into the selected positions (everything else of the row becomes 0). Plain
// loops do the same moves elsewhere (and where ENTMAX_CPU_PORTABLE=1 asks for them).
#pragma once

#include "cpu_common.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace entmax_cuda {
namespace cpu {

constexpr int kBatchLanes = 16;         // rows per batch: one AVX-512 vector of floats
constexpr int64_t kBatchMaxN = 512;     // longer rows fill vectors on their own
constexpr int kChunk = 16;              // entries per selection mask
constexpr int kMaxChunks = static_cast<int>(kBatchMaxN / kChunk);
static_assert(kBatchLanes == kChunk, "the transposes are 16 x 16");

inline int64_t round_up_chunk(int64_t n) { return (n + kChunk - 1) / kChunk * kChunk; }

// Whether the AVX-512 versions run: the CPU has AVX-512 F and ENTMAX_CPU_PORTABLE is not
// set to 1 (read once; the tests use it to run the plain loops on an AVX-512 machine).
inline bool lane_tables_use_avx512() {
#if defined(ENTMAX_CPU_AVX512_COMPRESS)
  static const bool use = [] {
    const char* portable = std::getenv("ENTMAX_CPU_PORTABLE");
    return __builtin_cpu_supports("avx512f") && !(portable != nullptr && std::strcmp(portable, "1") == 0);
  }();
  return use;
#else
  return false;
#endif
}

// One thread's batch tables: the staging rows and each row's selection masks.
struct LaneTables {
  std::vector<float> stage;   // [lane][stage_stride]: a row's selected entries, compacted
  std::vector<float> stage2;  // a second staging area (the backward's dy)
  int64_t stage_stride = 0;   // >= round_up_chunk(n) + kChunk: room for whole-chunk stores
  uint16_t masks[kBatchLanes][kMaxChunks];  // bit i of chunk k: entry 16 k + i is selected
  int64_t count[kBatchLanes];               // selected entries per row
  void reserve(int64_t n) {
    const int64_t stride = round_up_chunk(n) + kChunk;
    if (stage_stride >= stride) return;
    stage_stride = stride;
    stage.assign(stride * kBatchLanes, 0.0f);
    stage2.assign(stride * kBatchLanes, 0.0f);
  }
};

// What the forward's load found in a row.
enum class LaneStatus : int {
  kSolve,    // candidates in the table
  kFill,     // NaN or +inf in the row (fill NaN), or every entry -inf (fill 0)
  kTooMany,  // more candidates than the batch takes: the row goes alone
  kIdle,     // no row in this lane
};

struct LaneLoad {
  LaneStatus status = LaneStatus::kIdle;
  float m = 0;     // the row's max
  bool bad = false;  // NaN or +inf
};

// ------------------------------------------------------------------ portable versions

// table[j][l] = stage[l][j] for j < rows (rows a multiple of 16).
inline void stage_to_table_generic(const float* stage, int64_t stride, float* table, int64_t rows) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int l = 0; l < kBatchLanes; ++l) table[j * kBatchLanes + l] = stage[l * stride + j];
  }
}

inline void table_to_stage_generic(const float* table, int64_t rows, float* stage, int64_t stride) {
  for (int l = 0; l < kBatchLanes; ++l) {
    for (int64_t j = 0; j < rows; ++j) stage[l * stride + j] = table[j * kBatchLanes + l];
  }
}

// A row is loaded in two passes: first its max and whether it holds NaN or +inf (the
// backward: whether p or dy holds a NaN), then its selected entries compacted. Compaction
// stores at addresses that depend on the data, and loads issued behind such stores wait for
// them: the first pass's loads are kept out of their way.

// A row's max and whether it holds NaN or +inf.
ENTMAX_CPU_CLONES
LaneLoad scan_row_generic(const float* row, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t k = 0; k < n; ++k) {
    const float v = row[k];
    bad |= (v != v) | (v == std::numeric_limits<float>::infinity());
    m = v > m ? v : m;
  }
  LaneLoad load;
  load.m = m;
  load.bad = bad != 0;
  return load;
}

// The candidates u = x - m > cut of a row compacted into out (with their selection masks);
// returns their count. Branch-free: which entries are candidates is data, not a pattern a
// branch predictor learns.
ENTMAX_CPU_CLONES
int64_t compact_row_generic(const float* row, int64_t n, float m, float cut, float* out, uint16_t* masks) {
  int64_t c = 0;
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    unsigned mask = 0;
    for (int64_t k = k0; k < std::min(n, k0 + kChunk); ++k) {
      const float u = row[k] - m;  // u first: m - 1/eps may round to m itself
      const unsigned selected = u > cut;
      out[c] = u;  // kept only where selected: the next store goes to the same place otherwise
      c += selected;
      mask |= selected << (k - k0);
    }
    masks[k0 / kChunk] = static_cast<uint16_t>(mask);
  }
  return c;
}

// Whether p or dy of a row holds a NaN.
ENTMAX_CPU_CLONES
bool scan_support_generic(const float* p, const float* dy, int64_t n) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t k = 0; k < n; ++k) nan |= (p[k] != p[k]) | (dy[k] != dy[k]);
  return nan != 0;
}

// A row's entries with p > 0: p and dy compacted (with their masks); returns their count.
ENTMAX_CPU_CLONES
int64_t compact_support_generic(const float* p, const float* dy, int64_t n, float* p_out, float* dy_out,
                                uint16_t* masks) {
  int64_t c = 0;
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    unsigned mask = 0;
    for (int64_t k = k0; k < std::min(n, k0 + kChunk); ++k) {
      const unsigned selected = p[k] > 0.0f;
      p_out[c] = p[k];
      dy_out[c] = dy[k];
      c += selected;
      mask |= selected << (k - k0);
    }
    masks[k0 / kChunk] = static_cast<uint16_t>(mask);
  }
  return c;
}

// row[k] = the next compacted value at selected positions, 0 elsewhere.
ENTMAX_CPU_CLONES
void expand_row_generic(const float* in, const uint16_t* masks, int64_t n, float* row) {
  int64_t c = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t selected = (masks[k / kChunk] >> (k % kChunk)) & 1u;
    // a bit mask rather than a select, which GCC made a branch
    row[k] = __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, in[c]) & (0u - selected));
    c += selected;
  }
}

// ------------------------------------------------------------------ AVX-512 versions

#if defined(ENTMAX_CPU_AVX512_COMPRESS)
#define ENTMAX_AVX512 __attribute__((target("avx512f")))

// The all-ones-mask forms of the intrinsics, with an explicit (unused) source: the same
// instructions as the plain forms, whose _mm512_undefined_ps() GCC 12 reports as
// uninitialised (its bug 105593).
constexpr __mmask16 kAllLanes = 0xffff;
constexpr __mmask8 kAllPairs = 0xff;
ENTMAX_AVX512 inline __m512 max_avx512(__m512 a, __m512 b) { return _mm512_mask_max_ps(a, kAllLanes, a, b); }
ENTMAX_AVX512 inline __m512 unpacklo_avx512(__m512 a, __m512 b) { return _mm512_mask_unpacklo_ps(a, kAllLanes, a, b); }
ENTMAX_AVX512 inline __m512 unpackhi_avx512(__m512 a, __m512 b) { return _mm512_mask_unpackhi_ps(a, kAllLanes, a, b); }
ENTMAX_AVX512 inline __m512 unpacklo_pairs_avx512(__m512 a, __m512 b) {
  const __m512d ad = _mm512_castps_pd(a);
  return _mm512_castpd_ps(_mm512_mask_unpacklo_pd(ad, kAllPairs, ad, _mm512_castps_pd(b)));
}
ENTMAX_AVX512 inline __m512 unpackhi_pairs_avx512(__m512 a, __m512 b) {
  const __m512d ad = _mm512_castps_pd(a);
  return _mm512_castpd_ps(_mm512_mask_unpackhi_pd(ad, kAllPairs, ad, _mm512_castps_pd(b)));
}
template <int kImm>
ENTMAX_AVX512 inline __m512 shuffle_quads_avx512(__m512 a, __m512 b) {
  return _mm512_mask_shuffle_f32x4(a, kAllLanes, a, b, kImm);
}
// The largest of the 16 lanes.
ENTMAX_AVX512 inline float reduce_max_avx512(__m512 v) {
  v = max_avx512(v, shuffle_quads_avx512<0x4e>(v, v));              // 256-bit halves swapped
  v = max_avx512(v, shuffle_quads_avx512<0xb1>(v, v));              // 128-bit quarters swapped
  v = max_avx512(v, _mm512_mask_permute_ps(v, kAllLanes, v, 0x4e));  // pairs swapped
  v = max_avx512(v, _mm512_mask_permute_ps(v, kAllLanes, v, 0xb1));  // neighbours swapped
  return _mm512_cvtss_f32(v);
}

// 16 rows of 16 floats (src + i * src_stride) to 16 columns (dst + i * dst_stride): after
// the 32- and 64-bit interleaves, register 4g + s holds in its 128-bit lane q the entries
// 4q + s of rows 4g .. 4g + 3; the two 128-bit shuffles gather column s, 4 + s, 8 + s and
// 12 + s from the four groups.
ENTMAX_AVX512 inline void transpose16_avx512(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = unpacklo_avx512(r[i], r[i + 1]);
    t[i + 1] = unpackhi_avx512(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = unpacklo_pairs_avx512(t[i], t[i + 2]);
    r[i + 1] = unpackhi_pairs_avx512(t[i], t[i + 2]);
    r[i + 2] = unpacklo_pairs_avx512(t[i + 1], t[i + 3]);
    r[i + 3] = unpackhi_pairs_avx512(t[i + 1], t[i + 3]);
  }
  for (int s = 0; s < 4; ++s) {
    t[s] = shuffle_quads_avx512<0x88>(r[s], r[4 + s]);      // columns s, 8 + s of groups 0, 1
    t[4 + s] = shuffle_quads_avx512<0xdd>(r[s], r[4 + s]);  // columns 4 + s, 12 + s
    t[8 + s] = shuffle_quads_avx512<0x88>(r[8 + s], r[12 + s]);
    t[12 + s] = shuffle_quads_avx512<0xdd>(r[8 + s], r[12 + s]);
  }
  for (int s = 0; s < 4; ++s) {
    _mm512_storeu_ps(dst + s * dst_stride, shuffle_quads_avx512<0x88>(t[s], t[8 + s]));
    _mm512_storeu_ps(dst + (8 + s) * dst_stride, shuffle_quads_avx512<0xdd>(t[s], t[8 + s]));
    _mm512_storeu_ps(dst + (4 + s) * dst_stride, shuffle_quads_avx512<0x88>(t[4 + s], t[12 + s]));
    _mm512_storeu_ps(dst + (12 + s) * dst_stride, shuffle_quads_avx512<0xdd>(t[4 + s], t[12 + s]));
  }
}

ENTMAX_AVX512 inline __mmask16 tail_mask(int64_t n, int64_t k) {
  return n - k >= kChunk ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1u);
}

ENTMAX_AVX512 inline LaneLoad scan_row_avx512(const float* row, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 pos_inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 m_v = neg_inf;
  __mmask16 bad = 0;
  for (int64_t k = 0; k < n; k += kChunk) {
    const __m512 v = _mm512_mask_loadu_ps(neg_inf, tail_mask(n, k), row + k);
    bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v, pos_inf, _CMP_EQ_OQ);
    m_v = max_avx512(m_v, v);
  }
  LaneLoad load;
  load.m = reduce_max_avx512(m_v);
  load.bad = bad != 0;
  return load;
}

ENTMAX_AVX512 inline int64_t compact_row_avx512(const float* row, int64_t n, float m, float cut, float* out,
                                                uint16_t* masks) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 m_b = _mm512_set1_ps(m), cut_b = _mm512_set1_ps(cut);
  int64_t c = 0;
  for (int64_t k = 0; k < n; k += kChunk) {
    const __m512 u = _mm512_sub_ps(_mm512_mask_loadu_ps(neg_inf, tail_mask(n, k), row + k), m_b);
    const __mmask16 selected = _mm512_cmp_ps_mask(u, cut_b, _CMP_GT_OQ);
    // compress in a register, then a whole-vector store (the memory form is slow on AMD)
    _mm512_storeu_ps(out + c, _mm512_mask_compress_ps(neg_inf, selected, u));
    masks[k / kChunk] = selected;
    c += __builtin_popcount(selected);
  }
  return c;
}

ENTMAX_AVX512 inline bool scan_support_avx512(const float* p, const float* dy, int64_t n) {
  __mmask16 nan = 0;
  for (int64_t k = 0; k < n; k += kChunk) {
    const __mmask16 in_row = tail_mask(n, k);
    const __m512 pv = _mm512_maskz_loadu_ps(in_row, p + k), dv = _mm512_maskz_loadu_ps(in_row, dy + k);
    nan |= _mm512_cmp_ps_mask(pv, pv, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(dv, dv, _CMP_UNORD_Q);
  }
  return nan != 0;
}

ENTMAX_AVX512 inline int64_t compact_support_avx512(const float* p, const float* dy, int64_t n, float* p_out,
                                                    float* dy_out, uint16_t* masks) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t c = 0;
  for (int64_t k = 0; k < n; k += kChunk) {
    const __mmask16 in_row = tail_mask(n, k);
    const __m512 pv = _mm512_maskz_loadu_ps(in_row, p + k), dv = _mm512_maskz_loadu_ps(in_row, dy + k);
    const __mmask16 selected = _mm512_cmp_ps_mask(pv, zero, _CMP_GT_OQ);
    _mm512_storeu_ps(p_out + c, _mm512_maskz_compress_ps(selected, pv));
    _mm512_storeu_ps(dy_out + c, _mm512_maskz_compress_ps(selected, dv));
    masks[k / kChunk] = selected;
    c += __builtin_popcount(selected);
  }
  return c;
}

ENTMAX_AVX512 inline void expand_row_avx512(const float* in, const uint16_t* masks, int64_t n, float* row) {
  int64_t c = 0;
  for (int64_t k = 0; k < n; k += kChunk) {
    const __mmask16 selected = masks[k / kChunk];
    const __m512 v = _mm512_maskz_expand_ps(selected, _mm512_loadu_ps(in + c));
    _mm512_mask_storeu_ps(row + k, tail_mask(n, k), v);
    c += __builtin_popcount(selected);
  }
}

ENTMAX_AVX512 inline void stage_to_table_avx512(const float* stage, int64_t stride, float* table, int64_t rows) {
  for (int64_t j = 0; j < rows; j += kChunk) transpose16_avx512(stage + j, stride, table + j * kBatchLanes, kBatchLanes);
}

ENTMAX_AVX512 inline void table_to_stage_avx512(const float* table, int64_t rows, float* stage, int64_t stride) {
  for (int64_t j = 0; j < rows; j += kChunk) transpose16_avx512(table + j * kBatchLanes, kBatchLanes, stage + j, stride);
}
#endif

// ------------------------------------------------------------------ the batch operations

inline void stage_to_table(const float* stage, int64_t stride, float* table, int64_t rows) {
#if defined(ENTMAX_CPU_AVX512_COMPRESS)
  if (lane_tables_use_avx512()) return stage_to_table_avx512(stage, stride, table, rows);
#endif
  stage_to_table_generic(stage, stride, table, rows);
}

// Pads each staged row with `pad` from its count to `rows`, in whole chunks (the stride
// leaves room for the last one).
inline void pad_stage(float* stage, int64_t stride, const int64_t* count, int64_t rows, float pad) {
  for (int l = 0; l < kBatchLanes; ++l) {
    float* s = stage + l * stride;
    for (int64_t j = count[l]; j < rows; j += kChunk) {
      for (int i = 0; i < kChunk; ++i) s[j + i] = pad;
    }
  }
}

// The plain or the AVX-512 version of a row operation.
#if defined(ENTMAX_CPU_AVX512_COMPRESS)
#define ENTMAX_LANE_OP(NAME, ...) (lane_tables_use_avx512() ? NAME##_avx512(__VA_ARGS__) : NAME##_generic(__VA_ARGS__))
#else
#define ENTMAX_LANE_OP(NAME, ...) NAME##_generic(__VA_ARGS__)
#endif

// Forward: loads the rows rows[l] (contiguous floats, nullptr for no row) and puts each
// row's candidates (u = x - max > cut[l]) in column l of table[j * kBatchLanes + l]: rows
// with more than max_count candidates, NaN or +inf, or nothing but -inf get no column
// (load[l] says which). Returns the table's height: the most candidates of a column,
// rounded up to whole chunks; columns are padded with -inf.
inline int64_t load_candidates(const float* const* rows, int64_t n, const float* cut, int64_t max_count,
                               LaneTables& lt, float* table, LaneLoad* load) {
  const int64_t stride = lt.stage_stride;
  int64_t most = 0;
  for (int l = 0; l < kBatchLanes; ++l) {
    lt.count[l] = 0;
    load[l] = LaneLoad();
    if (rows[l] == nullptr) continue;
    load[l] = ENTMAX_LANE_OP(scan_row, rows[l], n);
    if (load[l].bad || load[l].m == -std::numeric_limits<float>::infinity()) {
      load[l].status = LaneStatus::kFill;
      continue;
    }
    const int64_t c =
        ENTMAX_LANE_OP(compact_row, rows[l], n, load[l].m, cut[l], lt.stage.data() + l * stride, lt.masks[l]);
    if (c > max_count) {
      load[l].status = LaneStatus::kTooMany;
      continue;
    }
    load[l].status = LaneStatus::kSolve;
    lt.count[l] = c;
    most = std::max(most, c);
  }
  const int64_t height = round_up_chunk(most);
  pad_stage(lt.stage.data(), stride, lt.count, height, -std::numeric_limits<float>::infinity());
  stage_to_table(lt.stage.data(), stride, table, height);
  return height;
}

// Backward: the support (p > 0) of the rows p_rows[l] with their dy, in column l of
// p_table and dy_table, zero-padded; lanes whose p or dy holds a NaN, or whose support is
// more than max_count, get count -1 (they go alone). Returns the tables' height.
inline int64_t load_supports(const float* const* p_rows, const float* const* dy_rows, int64_t n, int64_t max_count,
                             LaneTables& lt, float* p_table, float* dy_table) {
  const int64_t stride = lt.stage_stride;
  int64_t most = 0;
  int64_t pad_from[kBatchLanes];
  for (int l = 0; l < kBatchLanes; ++l) {
    lt.count[l] = 0;
    pad_from[l] = 0;
    if (p_rows[l] == nullptr) continue;
    const bool nan = ENTMAX_LANE_OP(scan_support, p_rows[l], dy_rows[l], n);
    const int64_t c = nan ? -1
                          : ENTMAX_LANE_OP(compact_support, p_rows[l], dy_rows[l], n, lt.stage.data() + l * stride,
                                           lt.stage2.data() + l * stride, lt.masks[l]);
    if (c < 0 || c > max_count) {
      lt.count[l] = -1;
      continue;
    }
    lt.count[l] = c;
    pad_from[l] = c;
    most = std::max(most, c);
  }
  const int64_t height = round_up_chunk(most);
  pad_stage(lt.stage.data(), stride, pad_from, height, 0.0f);
  pad_stage(lt.stage2.data(), stride, pad_from, height, 0.0f);
  stage_to_table(lt.stage.data(), stride, p_table, height);
  stage_to_table(lt.stage2.data(), stride, dy_table, height);
  return height;
}

// Writes column l of table (height rows) to rows[l] (contiguous floats; nullptr: none) at
// the positions the load selected (lt.masks), 0 everywhere else.
inline void store_selected(const float* table, int64_t height, float* const* rows, int64_t n, LaneTables& lt) {
  const int64_t stride = lt.stage_stride;
#if defined(ENTMAX_CPU_AVX512_COMPRESS)
  if (lane_tables_use_avx512()) {
    table_to_stage_avx512(table, height, lt.stage.data(), stride);
    for (int l = 0; l < kBatchLanes; ++l) {
      if (rows[l] != nullptr) expand_row_avx512(lt.stage.data() + l * stride, lt.masks[l], n, rows[l]);
    }
    return;
  }
#endif
  table_to_stage_generic(table, height, lt.stage.data(), stride);
  for (int l = 0; l < kBatchLanes; ++l) {
    if (rows[l] != nullptr) expand_row_generic(lt.stage.data() + l * stride, lt.masks[l], n, rows[l]);
  }
}

}  // namespace cpu
}  // namespace entmax_cuda
