// CUDA forward kernels (no torch here: pointers, sizes, template arguments). The steps,
// shares and combine orders are those of entmax_rows.h; cpu/gpu_twins.h runs the same on
// the CPU.
//  - forward_group_kernel<G, K>: rows of up to G * K <= 1024 entries, a group of G lanes
//    per row (kGroupBlockThreads / G rows per block), K entries per lane in registers; the
//    candidates compacted into the group's shared memory; each lane keeps its candidates'
//    p of the last evaluation in registers and writes them (no extra pass).
//  - forward_long_row_kernel<CACHED, BLOCKS>: a block per row, or a cluster of BLOCKS
//    blocks per row; each block's chunk of the row cached in shared memory when it fits,
//    else re-read from global memory (L2) in every pass.
#pragma once

#include "reduce.cuh"

#include <type_traits>

namespace entmax_cuda {
namespace cuda {

// ------------------------------------------------------------------ rows of up to 1024 entries

// The root finding of the rows of this pass (`mine`: this group's row is one of them),
// in arithmetic comp_t, and their output. Every lane of the warp calls it (lockstep).
// Returns whether comp_t resolved this group's row (RootFinder::settled; true if not mine).
// The lanes keep their candidates' p in registers for the output; the double pass (float
// rows with alpha > 2, rare) evaluates them once more instead, for the registers' sake.
template <typename comp_t, typename scalar_t, typename acc_t, int G, int K>
__device__ __forceinline__ bool solve_group_rows(bool mine, scalar_t* yr, int n, int lane, const acc_t* value,
                                                 const uint16_t* index, int c, unsigned candidate_slots, acc_t m_acc,
                                                 acc_t eps_acc, acc_t sum_u) {
  const comp_t eps = static_cast<comp_t>(eps_acc), m = static_cast<comp_t>(m_acc);
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  const EntryForm form = entry_form(eps);
  const int c_mine = mine ? c : 0;

  // Jensen's start (0 < eps <= 1): from all candidates, then the recounts.
  const bool jensen = mine && jensen_applies(eps);
  const comp_t all_u = group_combine<G>(static_cast<comp_t>(sum_u));
  comp_t start = jensen ? jensen_lower_bound(all_u, static_cast<comp_t>(c), eps) : comp_t(0);
  for (int round = 1; round < kJensenRounds; ++round) {
    comp_t sum = 0, count = 0;
    if (jensen) lane_jensen_share<comp_t, acc_t, G, K>(value, c, lane, m, start - inv_eps, sum, count);
    sum = group_combine<G>(sum);
    count = group_combine<G>(count);
    if (jensen) start = max_(start, jensen_lower_bound(sum, count, eps));
  }

  RootFinder<comp_t> rf[1];  // finished unless this pass has a row here
  if (mine) rf[0] = RootFinder<comp_t>(threshold_upper_bound(eps, static_cast<comp_t>(c)), eps, start);
  comp_t p[K];
  comp_t discarded[K];
  find_thresholds<comp_t, 1>(
      rf,
      [&](RootFinder<comp_t> (&r)[1], RootSums<comp_t> (&sums)[1]) {
        sums[0] = group_combine<G>(lane_root_share<comp_t, acc_t, LibMath, G, K>(
            value, c_mine, lane, m, r[0].t, eps, inv_eps, form, std::is_same<comp_t, acc_t>::value ? p : discarded));
      },
      [](bool done) { return __all_sync(kFullMask, done); });
  if (!mine) return true;
  constexpr bool kKeepP = std::is_same<comp_t, acc_t>::value;
  if (!kKeepP) lane_root_share<comp_t, acc_t, LibMath, G, K>(value, c, lane, m, rf[0].t, eps, inv_eps, form, p);
  lane_write<scalar_t, comp_t, acc_t, G, K>(yr, n, lane, candidate_slots, acc_t(0), index, c, p, comp_t(1) / rf[0].F);
  return rf[0].settled();
}

// The double pass (float rows with alpha > 2, and those float32 does not resolve), out of
// line: rare, and its double special functions would otherwise raise every row's register
// budget.
template <typename scalar_t, typename acc_t, int G, int K>
__device__ __noinline__ void solve_wide_group_rows(bool mine, scalar_t* yr, int n, int lane, const acc_t* value,
                                                   const uint16_t* index, int c, unsigned candidate_slots, acc_t m,
                                                   acc_t eps, acc_t sum_u) {
  solve_group_rows<double, scalar_t, acc_t, G, K>(mine, yr, n, lane, value, index, c, candidate_slots, m, eps, sum_u);
}

template <typename scalar_t, int G, int K>
__global__ void __launch_bounds__(kGroupBlockThreads, kGroupMinBlocksPerSM)
    forward_group_kernel(const scalar_t* __restrict__ x, const typename AccType<scalar_t>::type* __restrict__ alpha,
                         scalar_t* __restrict__ y, int64_t rows, int n) {
  using acc_t = typename AccType<scalar_t>::type;
  static_assert(kWarpLanes % G == 0 && K <= 32 && G * K <= kMaxGroupRow, "group shape");
  constexpr int kGroups = kGroupBlockThreads / G;  // rows per block
  __shared__ acc_t candidate_value[kGroups][G * K];
  __shared__ uint16_t candidate_index[kGroups][G * K];  // n <= 1024
  const int lane = threadIdx.x % G, group = threadIdx.x / G;
  const int first_lane = threadIdx.x % kWarpLanes - lane;  // the group's first lane in its warp
  acc_t* value = candidate_value[group];
  uint16_t* index = candidate_index[group];

  // Block-uniform loop: every warp runs the same iterations (its shuffles need all lanes).
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kGroups; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t row = first + group;
    const bool live = row < rows;
    const scalar_t* xr = x + (live ? row : 0) * n;
    scalar_t* yr = y + (live ? row : 0) * n;

    acc_t v[K];
    acc_t m = neg_inf<acc_t>();
    bool bad = false;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int k = lane + j * G;
      v[j] = live && k < n ? static_cast<acc_t>(xr[k]) : neg_inf<acc_t>();
      bad |= is_bad_entry(v[j]);
      m = v[j] > m ? v[j] : m;
    }
    m = group_max<G>(m);
    bad = (__ballot_sync(kFullMask, bad) & group_lanes<G>(first_lane)) != 0;
    const acc_t eps = live ? alpha[row] - acc_t(1) : acc_t(0);
    const RowKind kind = live ? classify_row(bad, m, eps) : RowKind::kZero;
    const bool solve = live && (kind == RowKind::kSolve || kind == RowKind::kWide);

    // The candidates, compacted in row order (slot j of lanes 0..G-1, then slot j + 1).
    unsigned candidate_slots = 0;
    int c = 0;
    acc_t sum_u = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int k = lane + j * G;
      const bool candidate = solve && k < n && is_candidate(v[j], m, eps);
      const unsigned in_group = (__ballot_sync(kFullMask, candidate) & group_lanes<G>(first_lane)) >> first_lane;
      if (candidate) {
        const int q = c + __popc(in_group & ((1u << lane) - 1u));
        value[q] = v[j];
        index[q] = static_cast<uint16_t>(k);
        candidate_slots |= 1u << j;
        sum_u += v[j] - m;
      }
      c += __popc(in_group);
    }
    __syncwarp();

    if (live && !solve) {  // NaN rows and all-masked rows
      const acc_t fill = kind == RowKind::kNan ? quiet_nan<acc_t>() : acc_t(0);
      lane_fill<scalar_t, acc_t, G, K>(yr, n, lane, fill);
    }
    const bool settled = solve_group_rows<acc_t, scalar_t, acc_t, G, K>(
        kind == RowKind::kSolve && live, yr, n, lane, value, index, c, candidate_slots, m, eps, sum_u);
    if constexpr (std::is_same<acc_t, float>::value) {
      const bool wide = live && (kind == RowKind::kWide || !settled);
      if (__any_sync(kFullMask, wide)) {
        solve_wide_group_rows<scalar_t, acc_t, G, K>(wide, yr, n, lane, value, index, c, candidate_slots, m, eps,
                                                     sum_u);
      }
    }
    __syncwarp();  // the group's candidates are rewritten for its next row
  }
}

// ------------------------------------------------------------------ long rows

// Loads a block's chunk of a row (into `cache` when CACHED): its max and whether it holds
// NaN or +inf. Float rows use 16-byte loads where aligned, several in flight per thread.
template <bool CACHED, typename scalar_t, typename acc_t>
__device__ __forceinline__ MaxBad<acc_t> load_chunk(const scalar_t* __restrict__ src, int64_t len, acc_t* cache) {
  MaxBad<acc_t> mb{neg_inf<acc_t>(), 0};
  int64_t vector_len = 0;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (reinterpret_cast<uintptr_t>(src) % 16 == 0) {
      vector_len = len / kVectorEntries * kVectorEntries;
      const float4* src4 = reinterpret_cast<const float4*>(src);
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < vector_len / kVectorEntries; i += kLongRowThreads) {
        const float4 q = src4[i];
        if (CACHED) reinterpret_cast<float4*>(cache)[i] = q;
        const float e[kVectorEntries] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int l = 0; l < kVectorEntries; ++l) {
          mb.bad |= is_bad_entry(e[l]);
          mb.m = e[l] > mb.m ? e[l] : mb.m;
        }
      }
    }
  }
  for (int64_t k = vector_len + threadIdx.x; k < len; k += kLongRowThreads) {
    const acc_t v = static_cast<acc_t>(src[k]);
    if (CACHED) cache[k] = v;
    mb.bad |= is_bad_entry(v);
    mb.m = v > mb.m ? v : mb.m;
  }
  return mb;
}

// The threshold of a long row in arithmetic comp_t (every block of the row's cluster takes
// the same steps on the same sums), then its chunk of the output. Returns whether comp_t
// resolved the row (RootFinder::settled; the same on every block of the cluster).
template <int BLOCKS, typename comp_t, typename scalar_t, typename Src>
__device__ bool solve_long_row(const Src* src, int64_t len, scalar_t* __restrict__ yr, comp_t m, comp_t eps,
                               ReduceSlots& slots) {
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  const EntryForm form = entry_form(eps);
  const Chunk local{0, len};
  const int tid = threadIdx.x;

  // The candidates' count and sum (the bracket; Jensen's start for 0 < eps <= 1).
  const comp_t cutoff = eps > comp_t(0) ? -inv_eps : neg_inf<comp_t>();
  CountSum cs{0, 0};
  thread_jensen_share<comp_t>(src, local, tid, kLongRowThreads, m, cutoff, cs.sum, cs.count);
  cs = reduce_row<BLOCKS>(cs, slots);
  const comp_t candidates = static_cast<comp_t>(cs.count);
  comp_t start = 0;
  if (jensen_applies(eps)) {
    start = jensen_lower_bound(static_cast<comp_t>(cs.sum), candidates, eps);
    for (int round = 1; round < kJensenRounds; ++round) {
      CountSum above{0, 0};
      thread_jensen_share<comp_t>(src, local, tid, kLongRowThreads, m, start - inv_eps, above.sum, above.count);
      above = reduce_row<BLOCKS>(above, slots);
      start = max_(start, jensen_lower_bound(static_cast<comp_t>(above.sum), static_cast<comp_t>(above.count), eps));
    }
  }

  RootFinder<comp_t> rf(threshold_upper_bound(eps, candidates), eps, start);
  double F = 1;
  find_threshold(rf, [&](comp_t t) {
    const RootSums<double> s = reduce_row<BLOCKS>(
        thread_root_share<comp_t, LibMath>(src, local, tid, kLongRowThreads, m, t, eps, inv_eps, form), slots);
    F = s.F;  // double: normalises the chunk exactly as the sums saw it
    return RootSums<comp_t>{static_cast<comp_t>(s.F), static_cast<comp_t>(s.dF), static_cast<comp_t>(s.d2F)};
  });

  const comp_t t = rf.t, inv_F = static_cast<comp_t>(1.0 / F);
  for (int64_t k = tid; k < len; k += kLongRowThreads) {
    const comp_t u = static_cast<comp_t>(src[k]) - m;
    const bool inside = form == EntryForm::kSoftmax || eps * (u - t) > comp_t(-1);
    yr[k] = static_cast<scalar_t>(inside ? entry_terms<comp_t, LibMath>(u, t, eps, inv_eps, form).p * inv_F : comp_t(0));
  }
  return rf.settled();
}

template <typename scalar_t, bool CACHED, int BLOCKS>
__global__ void __launch_bounds__(kLongRowThreads)
    forward_long_row_kernel(const scalar_t* __restrict__ x, const typename AccType<scalar_t>::type* __restrict__ alpha,
                            scalar_t* __restrict__ y, int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  acc_t* cache = reinterpret_cast<acc_t*>(dynamic_smem);
  __shared__ ReduceSlots slots;
  const Chunk chunk = start_long_row_block<BLOCKS>(n, slots);
  const int64_t len = chunk.end - chunk.begin;

  // Every block of a cluster takes the same rows (cluster-uniform loop and branches).
  for (int64_t row = blockIdx.x / BLOCKS; row < rows; row += gridDim.x / BLOCKS) {
    const scalar_t* xr = x + row * n + chunk.begin;
    scalar_t* yr = y + row * n + chunk.begin;
    const MaxBad<acc_t> mb = reduce_row<BLOCKS>(load_chunk<CACHED>(xr, len, cache), slots);
    const acc_t eps = alpha[row] - acc_t(1);
    const RowKind kind = classify_row(mb.bad != 0, mb.m, eps);
    if (kind == RowKind::kNan || kind == RowKind::kZero) {
      const acc_t fill = kind == RowKind::kNan ? quiet_nan<acc_t>() : acc_t(0);
      for (int64_t k = threadIdx.x; k < len; k += kLongRowThreads) yr[k] = static_cast<scalar_t>(fill);
    } else {
      // Float rows with alpha > 2, and those float32 does not resolve, in double.
      bool wide = kind == RowKind::kWide;
      if (!wide) {
        const bool settled = CACHED ? solve_long_row<BLOCKS, acc_t>(cache, len, yr, mb.m, eps, slots)
                                    : solve_long_row<BLOCKS, acc_t>(xr, len, yr, mb.m, eps, slots);
        wide = !settled && std::is_same<acc_t, float>::value;
      }
      if (wide) {
        if (CACHED) solve_long_row<BLOCKS, double>(cache, len, yr, double(mb.m), double(eps), slots);
        else solve_long_row<BLOCKS, double>(xr, len, yr, double(mb.m), double(eps), slots);
      }
    }
    __syncthreads();  // the cache is rewritten by the next row
  }
  cluster_exit_barrier<BLOCKS>();
}

}  // namespace cuda
}  // namespace entmax_cuda
