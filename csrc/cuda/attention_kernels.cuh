// CUDA kernels of the fused alpha-entmax attention: the CPU kernel's algorithm
// (docs/attention.md) with the same per-row math (attention_math.h), written once
// over the tile-matmul policies of attention_gemm.cuh (SIMT or tensor cores).
//
//   attention_forward_kernel      one CTA per (batch, head, 64-query tile): pass 0,
//                                 threshold passes, output pass (in column chunks of
//                                 the value dim), stats and the block map.
//   attention_backward_rows_kernel  one CTA per (batch, head, query tile): the row
//                                 sums (q_i, the alpha-gradient), then dQ per chunk.
//   attention_backward_keys_kernel  one CTA per (batch, kv head, 64-key tile, job):
//                                 job = one column chunk of dV or of dK, over the
//                                 group's query heads and the active query tiles.
// Each output element is summed by one CTA in a fixed order: deterministic.
// No torch here; attention_launch.cuh launches these.
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
  int64_t offset;  // causal_offset()
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
  void* q_rows;  // (B, Hq, Lq) scratch: q_i of the row sweep for the key sweep
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
  int64_t visible[kTile];      // keys [0, visible) may be unmasked
  int64_t mask_offset[kTile];  // element offset of the query's mask row
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
  const int64_t left = L - row0;
  t.rows = left < kTile ? static_cast<int>(left) : kTile;
  t.cols = cols;
  t.vec16 = vec16;
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t alpha_at(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return static_cast<const acc_t*>(p.alpha)[b * p.alpha_st[0] + h * p.alpha_st[1] + i * p.alpha_st[2]];
}

__device__ __forceinline__ int64_t stat_index(const AttentionParams& p, int64_t b, int64_t h, int stat, int64_t i) {
  return ((b * p.Hq + h) * attention::kNumStats + stat) * p.Lq + i;
}

// Keys [0, visible) of query row i may be unmasked (causal, Lk); rows past Lq see none.
__device__ __forceinline__ int64_t row_visible(const AttentionParams& p, int64_t i) {
  return i < p.Lq ? attention::visible_keys(i, p.causal, p.offset, p.Lk) : 0;
}

__device__ __forceinline__ int64_t mask_row_offset(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return b * p.mask_st[0] + h * p.mask_st[1] + i * p.mask_st[2];
}

// Keys [j0, j0 + limit) of the block at j0 are in a row's visible prefix (limit in [0, 64]).
__device__ __forceinline__ int block_limit(int64_t visible, int64_t j0) {
  const int64_t n = visible - j0;
  return n <= 0 ? 0 : (n >= kTile ? kTile : static_cast<int>(n));
}

// The CPU's mask_scores for the entry of key j0 + c: past the row's visible prefix
// -inf, bool False -inf, additive entries added.
template <typename acc_t>
__device__ __forceinline__ acc_t masked(const AttentionParams& p, acc_t s, int limit, int64_t mask_offset, int64_t j0,
                                        int c) {
  if (c >= limit) return neg_inf<acc_t>();
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

// ------------------------------------------------------------------ forward

template <class Gemm>
__device__ __forceinline__ void forward_tile(const AttentionParams& p) {
  using acc_t = typename Gemm::acc_t;
  using scalar_t = typename Gemm::scalar;
  using Threshold = RowThreshold<acc_t>;
  constexpr int NT = Gemm::kChunk / 8;
  ENTMAX_DYNAMIC_SMEM(smem);
  const ForwardSmem<Gemm> layout(p.D, p.Dv, p.n_bm);
  Gemm gemm(smem, layout.dims);
  acc_t* block_max = reinterpret_cast<acc_t*>(smem + layout.block_max);
  acc_t* warp_max = reinterpret_cast<acc_t*>(smem + layout.warp_max);
  const FragCoord fc;
  const int tid = threadIdx.x;

  const QueryTile tile = query_tile_of(p, blockIdx.x);
  const int64_t b = tile.b, h = tile.h, qt = tile.qt, hk = h / p.group;
  const int64_t i0 = qt * kTile;
  const int64_t n_kt = attention::key_tiles_for_query_tile(qt, p.Lq, p.Lk, p.causal);
  uint8_t* map_row = p.block_map + ((b * p.Hq + h) * p.nQ + qt) * p.nK;
  for (int64_t kt = n_kt + tid; kt < p.nK; kt += kThreads) map_row[kt] = 0;  // never visited
  for (int x = tid; x < p.n_bm; x += kThreads) block_max[x] = neg_inf<acc_t>();

  int64_t row_i[2], visible[2], mask_offset[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_i[r] = i0 + fc.row(r);
    visible[r] = row_visible(p, row_i[r]);
    mask_offset[r] = mask_row_offset(p, b, h, row_i[r]);
  }
  gemm.template load<kX0>(tile_of<scalar_t>(p.q, p.q_st, p.q_vec16, b, h, i0, p.Lq, p.D), acc_t(p.scale));
  Frag<acc_t, kTileNt> S;

  // S of key tile kt (masked) for every warp with `active`, all threads taking part.
  auto scores = [&](int64_t kt, bool active) {
    __syncthreads();
    gemm.template load<kY0>(tile_of<scalar_t>(p.k, p.k_st, p.k_vec16, b, hk, kt * kTile, p.Lk, p.D), acc_t(1));
    __syncthreads();
    gemm.template xy_t<kX0, kY0>(S, active);
    if (!active) return;
    const int64_t j0 = kt * kTile;
    const int limit[2] = {block_limit(visible[0], j0), block_limit(visible[1], j0)};
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        S.v[nt][e] = masked(p, S.v[nt][e], limit[e >> 1], mask_offset[e >> 1], j0, fc.col(nt, e));
  };

  // Pass 0: per row the max, the count of unmasked keys, NaN/+inf, the largest
  // scores; per block the max score.
  acc_t row_max[2] = {neg_inf<acc_t>(), neg_inf<acc_t>()};
  int64_t count[2] = {0, 0};
  bool bad[2] = {false, false};
  acc_t cand[2][kCandidates];
  acc_t rejected[2] = {neg_inf<acc_t>(), neg_inf<acc_t>()};
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < kCandidates; ++c) cand[r][c] = neg_inf<acc_t>();
  for (int64_t kt = 0; kt < n_kt; ++kt) {
    scores(kt, true);
    acc_t tile_max = neg_inf<acc_t>();
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const acc_t x = S.v[nt][e];
        bad[r] |= (x != x) || x == -neg_inf<acc_t>();
        count[r] += x > neg_inf<acc_t>();
        row_max[r] = max_no_nan(row_max[r], x);
        tile_max = max_no_nan(tile_max, x);
        keep_largest(cand[r], rejected[r], x);
      }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) tile_max = max_no_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, m));
    if (fc.lane == 0) warp_max[fc.warp] = tile_max;
    __syncthreads();
    if (tid == 0) {
      acc_t mx = block_max[kt >> p.bm_shift];
      for (int w = 0; w < kWarps; ++w) mx = max_no_nan(mx, warp_max[w]);
      block_max[kt >> p.bm_shift] = mx;
    }
  }
  __syncthreads();  // block maxima complete

  // Start of each row's threshold search (every lane of a quad holds its two rows).
  Threshold th[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_max[r] = max_no_nan(row_max[r], __shfl_xor_sync(kFullMask, row_max[r], 1));
    row_max[r] = max_no_nan(row_max[r], __shfl_xor_sync(kFullMask, row_max[r], 2));
    count[r] += __shfl_xor_sync(kFullMask, count[r], 1);
    count[r] += __shfl_xor_sync(kFullMask, count[r], 2);
    int any_bad_entry = bad[r];
    any_bad_entry |= __shfl_xor_sync(kFullMask, any_bad_entry, 1);
    any_bad_entry |= __shfl_xor_sync(kFullMask, any_bad_entry, 2);
    bad[r] = any_bad_entry != 0;
    merge_largest(cand[r], rejected[r], 1);
    merge_largest(cand[r], rejected[r], 2);
    if (row_i[r] < p.Lq) {
      RowCandidates<acc_t, kCandidates> rc;
      rc.reset();
#pragma unroll
      for (int c = 0; c < kCandidates; ++c) {
        rc.value[c] = cand[r][c];
        rc.count += cand[r][c] > neg_inf<acc_t>();
      }
      rc.max_rejected = rejected[r];
      th[r].start(alpha_at<acc_t>(p, b, h, row_i[r]), row_max[r], count[r], bad[r], rc);
    }
  }

  // Threshold passes, then the output pass at the thresholds they settle on; again for the
  // rows whose finder does not accept the output pass's evaluation (rare: see RowThreshold).
  const bool any_bad = __syncthreads_or(th[0].kind == Threshold::kBad || th[1].kind == Threshold::kBad);
  double sum_p[2], minus_dF_out[2];
  for (;;) {
    // Threshold passes while a row of the tile iterates; a block is skipped when it
    // is zero at every threshold >= lo for every pending row (for a warp: its rows).
    for (;;) {
      const bool pending[2] = {!th[0].ready, !th[1].ready};
      if (!__syncthreads_or(pending[0] || pending[1])) break;
      double F[2] = {0, 0}, minus_dF[2] = {0, 0};
      for (int64_t kt = 0; kt < n_kt; ++kt) {
        const acc_t M = block_max[kt >> p.bm_shift];
        bool need[2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
          need[r] = pending[r] && !attention::zero_at_or_above(M - th[r].m, th[r].lo, th[r].eps);
        const bool warp_need = __any_sync(kFullMask, need[0] || need[1]);
        if (!__syncthreads_or(warp_need)) continue;
        scores(kt, warp_need);
        if (!warp_need) continue;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          acc_t f = 0, dz = 0;
          if (need[r]) {
            const acc_t t = th[r].t();
#pragma unroll
            for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
              for (int e = 2 * r; e < 2 * r + 2; ++e) {
                const EntryAtT<acc_t> en = attention::score_entry(S.v[nt][e] - th[r].m, t, th[r].eps, th[r].inv_eps);
                f += en.p;
                dz += en.p_over_z;
              }
          }
          F[r] += quad_sum(f);
          minus_dF[r] += quad_sum(dz);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (pending[r]) th[r].update(static_cast<acc_t>(F[r]), static_cast<acc_t>(-minus_dF[r]));
    }

    // Output pass, one chunk of value columns at a time (the block map, sum p and F' in the first).
    sum_p[0] = sum_p[1] = 0;
    minus_dF_out[0] = minus_dF_out[1] = 0;
    Frag<acc_t, NT> O;
    for (int c0 = 0; c0 < p.Dv; c0 += Gemm::kChunk) {
      O.zero();
      for (int64_t kt = 0; kt < n_kt; ++kt) {
        const acc_t M = block_max[kt >> p.bm_shift];
        bool act[2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
          act[r] = th[r].computes() && !attention::zero_at_or_above(M - th[r].m, th[r].t(), th[r].eps);
        const bool warp_act = __any_sync(kFullMask, act[0] || act[1]);
        const bool block_act = __syncthreads_or(warp_act);
        // A bad row's gradient is NaN wherever it can attend: the backward visits those blocks.
        if (c0 == 0 && tid == 0) map_row[kt] = (block_act || (any_bad && M > neg_inf<acc_t>())) ? 1 : 0;
        if (!block_act) continue;
        gemm.template load<kY1>(tile_of<scalar_t>(p.v, p.v_st, p.v_vec16, b, hk, kt * kTile, p.Lk, p.Dv), acc_t(1), c0);
        scores(kt, warp_act);  // its leading __syncthreads() also covers the V load
        if (warp_act) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            acc_t f = 0, dz = 0;
            const acc_t t = th[r].t();
#pragma unroll
            for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
              for (int e = 2 * r; e < 2 * r + 2; ++e) {
                EntryAtT<acc_t> en{acc_t(0), acc_t(0)};
                if (act[r]) en = attention::score_entry(S.v[nt][e] - th[r].m, t, th[r].eps, th[r].inv_eps);
                S.v[nt][e] = en.p;
                f += en.p;
                dz += en.p_over_z;
              }
            if (c0 == 0) {
              sum_p[r] += quad_sum(f);
              minus_dF_out[r] += quad_sum(dz);
            }
          }
        }
        gemm.template a_y<kY1>(O, S, 0, warp_act);
      }
      // out = O / sum p; bad rows NaN, empty rows 0.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (row_i[r] >= p.Lq) continue;
        acc_t o_scale;
        if (th[r].kind == Threshold::kBad) o_scale = quiet_nan<acc_t>();
        else if (th[r].kind == Threshold::kEmpty) o_scale = acc_t(0);
        else o_scale = static_cast<acc_t>(1.0 / sum_p[r]);
        store_row_chunk(static_cast<scalar_t*>(p.out) + ((b * p.Hq + h) * p.Lq + row_i[r]) * p.Dv, O, r, c0, p.Dv,
                        o_scale);
      }
    }

    bool accepted = true;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row_i[r] < p.Lq)
        accepted &= th[r].check_output(static_cast<acc_t>(sum_p[r]), static_cast<acc_t>(-minus_dF_out[r]));
    if (!__syncthreads_or(!accepted)) break;
  }

  // Row statistics (lane 0 of a quad writes its first row, lane 1 its second).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (fc.tq != r || row_i[r] >= p.Lq) continue;
    acc_t m = th[r].m, t = th[r].t(), inv_norm;
    if (th[r].kind == Threshold::kBad) {
      m = t = inv_norm = quiet_nan<acc_t>();
    } else if (th[r].kind == Threshold::kEmpty) {
      m = neg_inf<acc_t>();
      t = inv_norm = acc_t(0);
    } else {
      inv_norm = static_cast<acc_t>(1.0 / sum_p[r]);
    }
    acc_t* st = static_cast<acc_t*>(p.stats);
    st[stat_index(p, b, h, attention::kStatMax, row_i[r])] = m;
    st[stat_index(p, b, h, attention::kStatThreshold, row_i[r])] = t;
    st[stat_index(p, b, h, attention::kStatInvNorm, row_i[r])] = inv_norm;
    st[stat_index(p, b, h, attention::kStatEvaluations, row_i[r])] =
        static_cast<acc_t>(th[r].computes() ? th[r].evaluations : 0);
  }
}

// ------------------------------------------------------------------ backward

// A row's backward constants from the forward's statistics; rows past Lq are empty.
template <typename acc_t>
__device__ __forceinline__ void load_backward_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                                                  BackwardRow<acc_t>& row, bool& bad) {
  row = BackwardRow<acc_t>{};
  row.empty = true;
  bad = false;
  if (i >= p.Lq) return;
  const acc_t* st = static_cast<const acc_t*>(p.stats);
  const acc_t m = st[stat_index(p, b, h, attention::kStatMax, i)];
  const acc_t t = st[stat_index(p, b, h, attention::kStatThreshold, i)];
  const acc_t n = st[stat_index(p, b, h, attention::kStatInvNorm, i)];
  row.load(alpha_at<acc_t>(p, b, h, i), m, t, n);
  bad = (m != m) || (t != t) || (n != n) || !(row.eps >= acc_t(0));
}

// p_hat and g of one entry (the CPU's backward_block): a bad row is NaN wherever
// it attends, an empty row 0.
template <typename acc_t>
__device__ __forceinline__ BackwardEntry<acc_t> backward_entry(const BackwardRow<acc_t>& row, bool bad, acc_t s) {
  if (bad) {
    const acc_t x = s > neg_inf<acc_t>() ? quiet_nan<acc_t>() : acc_t(0);
    return BackwardEntry<acc_t>{x, x};
  }
  if (row.empty) return BackwardEntry<acc_t>{acc_t(0), acc_t(0)};
  return row.entry(s - row.m);
}

template <class Gemm>
__device__ __forceinline__ void backward_rows_tile(const AttentionParams& p) {
  using acc_t = typename Gemm::acc_t;
  using scalar_t = typename Gemm::scalar;
  constexpr int NT = Gemm::kChunk / 8;
  ENTMAX_DYNAMIC_SMEM(smem);
  const RowsSmem<Gemm> layout(p.D, p.Dv);
  Gemm gemm(smem, layout.dims);
  const FragCoord fc;

  const QueryTile tile = query_tile_of(p, blockIdx.x);
  const int64_t b = tile.b, h = tile.h, qt = tile.qt, hk = h / p.group;
  const int64_t i0 = qt * kTile;
  const int64_t n_kt = attention::key_tiles_for_query_tile(qt, p.Lq, p.Lk, p.causal);
  const uint8_t* map_row = p.block_map + ((b * p.Hq + h) * p.nQ + qt) * p.nK;

  int64_t row_i[2], visible[2], mask_offset[2];
  BackwardRow<acc_t> row[2];
  bool bad[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_i[r] = i0 + fc.row(r);
    visible[r] = row_visible(p, row_i[r]);
    mask_offset[r] = mask_row_offset(p, b, h, row_i[r]);
    load_backward_row(p, b, h, row_i[r], row[r], bad[r]);
  }
  gemm.template load<kX0>(tile_of<scalar_t>(p.q, p.q_st, p.q_vec16, b, h, i0, p.Lq, p.D), acc_t(p.scale));
  gemm.template load<kX1>(tile_of<scalar_t>(p.grad_out, p.do_st, p.do_vec16, b, h, i0, p.Lq, p.Dv), acc_t(1));
  Frag<acc_t, kTileNt> S, dP;

  // S (masked) and dP = dO V^T of an active block.
  auto block = [&](int64_t kt) {
    __syncthreads();
    gemm.template load<kY0>(tile_of<scalar_t>(p.k, p.k_st, p.k_vec16, b, hk, kt * kTile, p.Lk, p.D), acc_t(1));
    gemm.template load<kY1>(tile_of<scalar_t>(p.v, p.v_st, p.v_vec16, b, hk, kt * kTile, p.Lk, p.Dv), acc_t(1));
    __syncthreads();
    gemm.template xy_t<kX0, kY0>(S, true);
    gemm.template xy_t<kX1, kY1>(dP, true);
    const int64_t j0 = kt * kTile;
    const int limit[2] = {block_limit(visible[0], j0), block_limit(visible[1], j0)};
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        S.v[nt][e] = masked(p, S.v[nt][e], limit[e >> 1], mask_offset[e >> 1], j0, fc.col(nt, e));
  };

  // Sweep 1: per row G = sum g, sum g dP (and the alpha-gradient's sums): q_i, d alpha_i.
  BackwardSums<double> sums[2];
  sums[0].zero();
  sums[1].zero();
  for (int64_t kt = 0; kt < n_kt; ++kt) {
    if (!map_row[kt]) continue;
    block(kt);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      BackwardSums<acc_t> part;
      part.zero();
      if (!bad[r] && !row[r].empty) {
#pragma unroll
        for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            const BackwardEntry<acc_t> en = row[r].entry(S.v[nt][e] - row[r].m);
            if (p.alpha_grad) {
              math::accumulate_backward_entry(en.p_hat, dP.v[nt][e], row[r].eps, part);
            } else {
              part.g += en.g;
              part.g_dy += en.g * dP.v[nt][e];
            }
          }
      }
      part.g = quad_sum(part.g);
      part.g_dy = quad_sum(part.g_dy);
      if (p.alpha_grad) {
        part.g_c = quad_sum(part.g_c);
        part.g_dy_c = quad_sum(part.g_dy_c);
      }
      sums[r] = sums[r] + math::widen(part);
    }
  }
  acc_t q_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    q_row[r] = bad[r] ? quiet_nan<acc_t>() : static_cast<acc_t>(math::backward_q(sums[r].g, sums[r].g_dy));
    if (fc.tq != r || row_i[r] >= p.Lq) continue;
    const int64_t at = (b * p.Hq + h) * p.Lq + row_i[r];
    static_cast<acc_t*>(p.q_rows)[at] = q_row[r];
    const acc_t da = p.alpha_grad ? static_cast<acc_t>(math::alpha_gradient(sums[r]))
                                  : acc_t(0);
    static_cast<acc_t*>(p.grad_alpha)[at] = bad[r] ? quiet_nan<acc_t>() : da;
  }

  // Sweep 2: dQ = scale * sum dS K, dS = g (dP - q_i), one chunk of columns at a time.
  Frag<acc_t, NT> dQ;
  for (int c0 = 0; c0 < p.D; c0 += Gemm::kChunk) {
    dQ.zero();
    for (int64_t kt = 0; kt < n_kt; ++kt) {
      if (!map_row[kt]) continue;
      block(kt);
#pragma unroll
      for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const acc_t g = backward_entry(row[r], bad[r], S.v[nt][e]).g;
          S.v[nt][e] = g * (dP.v[nt][e] - q_row[r]);
        }
      gemm.template a_y<kY0>(dQ, S, c0, true);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row_i[r] >= p.Lq) continue;
      const acc_t scale = bad[r] ? quiet_nan<acc_t>() : acc_t(p.scale);
      store_row_chunk(static_cast<scalar_t*>(p.grad_q) + ((b * p.Hq + h) * p.Lq + row_i[r]) * p.D, dQ, r, c0, p.D,
                      scale);
    }
  }
}

template <class Gemm>
__device__ __forceinline__ void backward_keys_tile(const AttentionParams& p) {
  using acc_t = typename Gemm::acc_t;
  using scalar_t = typename Gemm::scalar;
  constexpr int NT = Gemm::kChunk / 8;
  ENTMAX_DYNAMIC_SMEM(smem);
  const KeysSmem<Gemm> layout(p.D, p.Dv);
  Gemm gemm(smem, layout.dims);
  QueryColumns<acc_t>& cols = *reinterpret_cast<QueryColumns<acc_t>*>(smem + layout.columns);
  const FragCoord fc;
  const int tid = threadIdx.x;

  // Job: one column chunk of dV (jobs [0, chunks_v)) or of dK; key tiles fastest.
  const int64_t kt = blockIdx.x % p.nK;
  const int64_t rest = blockIdx.x / p.nK;
  const int64_t b = (rest % (p.B * p.Hkv)) / p.Hkv, hk = rest % p.Hkv;
  const int job = static_cast<int>(rest / (p.B * p.Hkv));
  const bool is_dk = job >= p.chunks_v;
  const int c0 = (is_dk ? job - p.chunks_v : job) * Gemm::kChunk;
  const int64_t j0 = kt * kTile;

  gemm.template load<kX0>(tile_of<scalar_t>(p.k, p.k_st, p.k_vec16, b, hk, j0, p.Lk, p.D), acc_t(1));
  if (is_dk) gemm.template load<kX1>(tile_of<scalar_t>(p.v, p.v_st, p.v_vec16, b, hk, j0, p.Lk, p.Dv), acc_t(1));
  Frag<acc_t, kTileNt> S, dP;
  Frag<acc_t, NT> acc;
  acc.zero();

  for (int64_t gi = 0; gi < p.group; ++gi) {
    const int64_t h = hk * p.group + gi;
    for (int64_t qt = attention::first_query_tile_for_key_tile(kt, p.Lq, p.Lk, p.causal); qt < p.nQ; ++qt) {
      if (kt >= attention::key_tiles_for_query_tile(qt, p.Lq, p.Lk, p.causal) ||
          !p.block_map[((b * p.Hq + h) * p.nQ + qt) * p.nK + kt])
        continue;
      const int64_t i0 = qt * kTile;
      __syncthreads();  // the previous query tile's columns and slots are read
      if (tid < kTile) {
        const int64_t i = i0 + tid;
        bool bad;
        load_backward_row(p, b, h, i, cols.row[tid], bad);
        cols.bad[tid] = bad;
        cols.q[tid] = i < p.Lq ? static_cast<const acc_t*>(p.q_rows)[(b * p.Hq + h) * p.Lq + i] : acc_t(0);
        cols.visible[tid] = row_visible(p, i);
        cols.mask_offset[tid] = mask_row_offset(p, b, h, i);
      }
      gemm.template load<kY0>(tile_of<scalar_t>(p.q, p.q_st, p.q_vec16, b, h, i0, p.Lq, p.D), acc_t(p.scale));
      gemm.template load<kY1>(tile_of<scalar_t>(p.grad_out, p.do_st, p.do_vec16, b, h, i0, p.Lq, p.Dv), acc_t(1));
      __syncthreads();
      // Transposed tiles: rows are this CTA's keys, columns the query tile's queries.
      gemm.template xy_t<kX0, kY0>(S, true);
      if (is_dk) gemm.template xy_t<kX1, kY1>(dP, true);
#pragma unroll
      for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = fc.col(nt, e), key = fc.row(e >> 1);
          const acc_t s = masked(p, S.v[nt][e], block_limit(cols.visible[c], j0), cols.mask_offset[c], j0, key);
          const BackwardEntry<acc_t> en = backward_entry(cols.row[c], cols.bad[c] != 0, s);
          S.v[nt][e] = is_dk ? en.g * (dP.v[nt][e] - cols.q[c]) : en.p_hat;
        }
      // dV += P^T dO, dK += dS^T (scale Q)
      if (is_dk) gemm.template a_y<kY0>(acc, S, c0, true);
      else gemm.template a_y<kY1>(acc, S, c0, true);
    }
  }

  const int width = is_dk ? p.D : p.Dv;
  scalar_t* dst = static_cast<scalar_t*>(is_dk ? p.grad_k : p.grad_v);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = j0 + fc.row(r);
    if (j < p.Lk) store_row_chunk(dst + ((b * p.Hkv + hk) * p.Lk + j) * width, acc, r, c0, width, acc_t(1));
  }
}

// ------------------------------------------------------------------ kernels
// A tensor-core kernel compiled for an arch its mma does not exist on traps
// (the launcher never selects it there) and costs no compile time.
#if !defined(ENTMAX_CUDA_EMULATION)

template <class Gemm>
__host__ __device__ constexpr bool runs_here() {
  if constexpr (Gemm::kTensorCores) return tc_compiled_for_this_arch<typename Gemm::scalar>();
  else return true;
}

template <class Gemm>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const AttentionParams p) {
  if constexpr (runs_here<Gemm>()) forward_tile<Gemm>(p);
  else __trap();
}

template <class Gemm>
__global__ void __launch_bounds__(kThreads) attention_backward_rows_kernel(const AttentionParams p) {
  if constexpr (runs_here<Gemm>()) backward_rows_tile<Gemm>(p);
  else __trap();
}

template <class Gemm>
__global__ void __launch_bounds__(kThreads) attention_backward_keys_kernel(const AttentionParams p) {
  if constexpr (runs_here<Gemm>()) backward_keys_tile<Gemm>(p);
  else __trap();
}
#endif  // !ENTMAX_CUDA_EMULATION

}  // namespace attention_cuda
}  // namespace entmax_cuda
