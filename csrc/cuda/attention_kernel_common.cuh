// What the CUDA kernels of the fused alpha-entmax attention share: their parameters,
// shared-memory layouts and per-entry helpers (the sequence a CTA works on, the keys a row
// sees, masks and ALiBi). The kernels (the CPU kernel's algorithm, docs/attention.md, with
// the per-row math of attention_math.h, written once over the tile-matmul policies of
// attention_gemm.cuh) are in
//   attention_fwd_kernel.cuh  attention_forward_kernel: one CTA per (sequence, head,
//                             64-query tile): pass 0, threshold passes, output pass (in
//                             column chunks of the value dim), stats and the block map.
//   attention_bwd_kernel.cuh  attention_backward_rows_kernel: one CTA per (sequence, head,
//                             query tile): the row sums (q_i, the alpha-gradient), then dQ;
//                             attention_backward_keys_kernel: one CTA per (sequence, kv head,
//                             64-key tile, job): a column chunk of dV or of dK, over the
//                             group's query heads and the active query tiles.
// Each output element is summed by one CTA in a fixed order: deterministic.
// No torch here; attention_launch.cuh launches the kernels.
#pragma once

#include "../attention_math.h"
#include "attention_gemm.cuh"

namespace entmax_cuda {
namespace attention_cuda {

using attention::BackwardEntry;
using attention::BackwardRow;
using attention::EntryAtT;
using attention::RowCandidates;
using attention::RowThreshold;
using attention::kCandidates;
using math::BackwardSums;
using math::neg_inf;
using math::quiet_nan;

static_assert(kTile == attention::kBlockQ && kTile == attention::kBlockK, "a CTA tile is one block of the map");

enum Slot : int { kX0 = 0, kX1 = 1, kY0 = 2, kY1 = 3 };
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAdditiveMask = 2 };

// Everything the kernels read: tensors as pointers and element strides, sizes.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const void* grad_out;
  int64_t q_st[4], k_st[4], v_st[4], do_st[4];  // (b, h, row, column) strides
  bool q_vec16, k_vec16, v_vec16, do_vec16;     // 16-byte loads possible (TC)
  const void* alpha;
  int64_t alpha_st[3];
  const void* mask;  // bool (1 byte) or acc_t; mask_kind says which
  int64_t mask_st[4];
  int mask_kind;
  int causal;
  const void* alibi;  // (B, Hq) slopes in acc_t, or null
  int64_t alibi_st[2];
  int64_t window_left, window_right;  // -1: unbounded
  // Sequences (attention_ops.h's Shape): B of at most Lq queries and Lk keys. Packed:
  // cu_q/cu_k (B + 1) offsets along the rows of batch-1 tensors; else used_k (B), if
  // set, the keys each batch entry uses. rows_q/rows_k: the row tensors' and the key
  // tensors' row counts (Lq/Lk padded, total_q/total_k packed).
  const int32_t* cu_q;
  const int32_t* cu_k;
  const int32_t* used_k;
  bool packed;
  int64_t rows_q, rows_k;
  int64_t B, Hq, Hkv, group, Lq, Lk, nQ, nK;
  int D, Dv;
  double scale;
  // forward outputs (stats and block_map are read back by the backward)
  void* out;
  void* stats;
  uint8_t* block_map;
  int bm_shift;  // one block maximum per 2^bm_shift key tiles (0 unless the maxima outgrow shared memory)
  int n_bm;
  // backward
  void* grad_q;
  void* grad_k;
  void* grad_v;
  void* grad_alpha;
  void* q_rows;  // (rows_b, Hq, rows_q) scratch: q_i of the row sweep for the key sweep
  bool alpha_grad;
  int chunks_v, chunks_k;  // key-sweep jobs: column chunks of dV, then of dK
};

__host__ __device__ __forceinline__ size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// The CTA's dynamic shared memory (in the tests' CPU emulation: the emulated CTA's buffer).
#if defined(ENTMAX_CUDA_EMULATION)
#define ENTMAX_DYNAMIC_SMEM(name) unsigned char* name = ::entmax_cuda::emulation::dynamic_smem()
#else
#define ENTMAX_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ------------------------------------------------------------------ shared-memory layouts
// One function per kernel gives the slots and the byte offsets, for the launcher and the kernel alike.

template <class Gemm>
struct ForwardSmem {
  using acc_t = typename Gemm::acc_t;
  SlotDims dims;
  size_t block_max, warp_max, total;
  __host__ __device__ ForwardSmem(int D, int /*Dv*/, int n_bm) {
    dims = SlotDims{{D, 0, D, Gemm::kChunk}, {false, false, false, true}};
    block_max = align16(Gemm::smem_bytes(dims));
    warp_max = block_max + align16(static_cast<size_t>(n_bm) * sizeof(acc_t));
    total = warp_max + align16(kWarps * sizeof(acc_t));
  }
};

template <class Gemm>
struct RowsSmem {
  SlotDims dims;
  size_t total;
  __host__ __device__ RowsSmem(int D, int Dv) {
    dims = SlotDims{{D, Dv, D, Dv}, {false, false, true, false}};
    total = align16(Gemm::smem_bytes(dims));
  }
};

// Per query of the key sweep's current query tile.
template <typename acc_t>
struct QueryColumns {
  BackwardRow<acc_t> row[kTile];
  acc_t q[kTile];
  attention::KeyRange keys[kTile];  // keys the query may see
  int64_t mask_offset[kTile];       // element offset of the query's mask row
  unsigned char bad[kTile];
};

template <class Gemm>
struct KeysSmem {
  SlotDims dims;
  size_t columns, total;
  __host__ __device__ KeysSmem(int D, int Dv) {
    dims = SlotDims{{D, Dv, D, Dv}, {false, false, true, true}};
    columns = align16(Gemm::smem_bytes(dims));
    total = columns + align16(sizeof(QueryColumns<typename Gemm::acc_t>));
  }
};

// ------------------------------------------------------------------ helpers

template <typename scalar_t>
__device__ __forceinline__ TileSrc<scalar_t> tile_of(const void* base, const int64_t (&st)[4], bool vec16,
                                                     int64_t b, int64_t h, int64_t row0, int64_t L, int cols) {
  TileSrc<scalar_t> t;
  t.base = static_cast<const scalar_t*>(base) + b * st[0] + h * st[1] + row0 * st[2];
  t.rs = st[2];
  t.cs = st[3];
  const int64_t left = L - row0;  // rows of the tile that exist (none past L)
  t.rows = left <= 0 ? 0 : (left < kTile ? static_cast<int>(left) : kTile);
  t.cols = cols;
  t.vec16 = vec16;
  return t;
}

// Sequence b of the call: its batch index into the row and key tensors (rb), its
// first query row and key there (q0, k0), and which keys its rows see (geo).
struct Sequence {
  int64_t rb, q0, k0;
  attention::RowGeometry geo;
};

__device__ __forceinline__ Sequence sequence_of(const AttentionParams& p, int64_t b) {
  const attention::SequenceSpan sp = attention::sequence_span(b, p.cu_q, p.cu_k, p.used_k, p.Lq, p.Lk);
  return Sequence{sp.rb, sp.q0, sp.k0, attention::RowGeometry(sp.Lq, sp.Lk, p.causal, p.window_left, p.window_right)};
}

// The ALiBi slope of (b, h), 0 without ALiBi.
template <typename acc_t>
__device__ __forceinline__ acc_t alibi_slope(const AttentionParams& p, int64_t b, int64_t h) {
  return p.alibi == nullptr ? acc_t(0) : static_cast<const acc_t*>(p.alibi)[b * p.alibi_st[0] + h * p.alibi_st[1]];
}

// Row i of sequence sq: alpha, and its place in the row tensors (out, stats, q_rows).
template <typename acc_t>
__device__ __forceinline__ acc_t alpha_at(const AttentionParams& p, const Sequence& sq, int64_t h, int64_t i) {
  return static_cast<const acc_t*>(p.alpha)[sq.rb * p.alpha_st[0] + h * p.alpha_st[1] + (sq.q0 + i) * p.alpha_st[2]];
}

__device__ __forceinline__ int64_t row_index(const AttentionParams& p, const Sequence& sq, int64_t h, int64_t i) {
  return (sq.rb * p.Hq + h) * p.rows_q + sq.q0 + i;
}

__device__ __forceinline__ int64_t stat_index(const AttentionParams& p, const Sequence& sq, int64_t h, int stat,
                                              int64_t i) {
  return ((sq.rb * p.Hq + h) * attention::kNumStats + stat) * p.rows_q + sq.q0 + i;
}

// The keys query row i may see; rows past the sequence's end see none.
__device__ __forceinline__ attention::KeyRange row_keys(const Sequence& sq, int64_t i) {
  return i < sq.geo.Lq ? sq.geo.keys_of_row(i) : attention::KeyRange{0, 0};
}

__device__ __forceinline__ int64_t mask_row_offset(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return b * p.mask_st[0] + h * p.mask_st[1] + i * p.mask_st[2];
}

// The entries [first, limit) of the block at key j0 that a row with keys `keys` may see.
struct BlockCols {
  int first, limit;
};
__device__ __forceinline__ int clamp_to_tile(int64_t n) {
  return n <= 0 ? 0 : (n >= kTile ? kTile : static_cast<int>(n));
}
__device__ __forceinline__ BlockCols block_cols(attention::KeyRange keys, int64_t j0) {
  return BlockCols{clamp_to_tile(keys.lo - j0), clamp_to_tile(keys.hi - j0)};
}

// The CPU's score_tile rules for the entry of key j = j0 + c of row i: outside the
// row's keys -inf, ALiBi's bias added, then bool False -inf, additive entries added.
template <typename acc_t>
__device__ __forceinline__ acc_t masked(const AttentionParams& p, acc_t s, BlockCols bc, int64_t mask_offset,
                                        int64_t j0, int c, int64_t i, acc_t slope, int64_t diag) {
  if (c < bc.first || c >= bc.limit) return neg_inf<acc_t>();
  if (p.alibi != nullptr) s += attention::alibi_bias(slope, i, j0 + c, diag);
  if (p.mask_kind == kNoMask) return s;
  const int64_t at = mask_offset + (j0 + c) * p.mask_st[3];
  if (p.mask_kind == kBoolMask) return static_cast<const unsigned char*>(p.mask)[at] ? s : neg_inf<acc_t>();
  return s + static_cast<const acc_t*>(p.mask)[at];
}

template <typename T>
__device__ __forceinline__ T max_no_nan(T a, T b) { return b > a ? b : a; }

// The K largest of a stream (sorted, largest first; -inf when fewer), and the
// largest value offered but not kept. NaN and -inf are never kept.
template <typename T, int K>
__device__ __forceinline__ void keep_largest(T (&v)[K], T& rejected, T x) {
  if (x > v[K - 1]) {
    rejected = max_no_nan(rejected, v[K - 1]);
    v[K - 1] = x;
#pragma unroll
    for (int i = K - 1; i > 0; --i) {
      if (v[i] > v[i - 1]) {
        const T t = v[i];
        v[i] = v[i - 1];
        v[i - 1] = t;
      }
    }
  } else {
    rejected = max_no_nan(rejected, x);
  }
}

// Merges the lists of this lane and lane ^ lane_mask (both sorted, largest
// first): both lanes end with the K largest of the union, sorted, and the
// largest value of either stream not kept. A bitonic merge: the elementwise
// maxima of one list and the other reversed are the K largest, in bitonic order.
template <typename T, int K>
__device__ __forceinline__ void merge_largest(T (&v)[K], T& rejected, int lane_mask) {
  T c[K];
  T lost = rejected;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const T other = __shfl_xor_sync(kFullMask, v[K - 1 - i], lane_mask);
    const bool mine = v[i] > other;
    c[i] = mine ? v[i] : other;
    lost = max_no_nan(lost, mine ? other : v[i]);
  }
  rejected = max_no_nan(lost, __shfl_xor_sync(kFullMask, rejected, lane_mask));
#pragma unroll
  for (int s = K / 2; s > 0; s >>= 1)
#pragma unroll
    for (int i = 0; i < K; ++i)
      if ((i & s) == 0 && c[i] < c[i + s]) {
        const T t = c[i];
        c[i] = c[i + s];
        c[i + s] = t;
      }
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = c[i];
}

// The thread's part of row r (its row(r)) of a chunk of a D-wide result, columns c0 + col(nt, e)
// below width, times scale, into dst (the row's element 0).
template <typename scalar_t, typename acc_t, int NT>
__device__ __forceinline__ void store_row_chunk(scalar_t* dst, const Frag<acc_t, NT>& f, int r, int c0, int width,
                                                acc_t scale) {
  const FragCoord fc;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 2 * r; e < 2 * r + 2; ++e) {
      const int col = c0 + fc.col(nt, e);
      if (col < width) dst[col] = Scalar<scalar_t>::from_acc(f.v[nt][e] * scale);
    }
}

// The CTA's 64-query tile, in an order that starts the longest causal tiles first.
struct QueryTile {
  int64_t b, h, qt;
};
__device__ __forceinline__ QueryTile query_tile_of(const AttentionParams& p, int64_t item) {
  const int64_t bh_count = p.B * p.Hq;
  const int64_t bh = item % bh_count;
  return QueryTile{bh / p.Hq, bh % p.Hq, p.nQ - 1 - item / bh_count};
}

// A tensor-core kernel compiled for an arch its mma does not exist on traps
// (the launcher never selects it there) and costs no compile time.
#if !defined(ENTMAX_CUDA_EMULATION)
template <class Gemm>
__host__ __device__ constexpr bool runs_here() {
  if constexpr (Gemm::kTensorCores) return tc_compiled_for_this_arch<typename Gemm::scalar>();
  else return true;
}
#endif  // !ENTMAX_CUDA_EMULATION

}  // namespace attention_cuda
}  // namespace entmax_cuda
