// Reductions of the CUDA kernels, each in a fixed order (so every lane or block of a row
// gets bit-identical sums and takes the same root-finding steps; cpu/gpu_twins.h combines
// shares in the same orders):
//  - a group of G lanes of a warp: butterfly (xor) shuffles, G/2 apart first;
//  - a block: butterfly within each warp, then the warps' totals added in warp order;
//  - a cluster: the blocks' totals added in rank order, read through distributed shared
//    memory (sm_90+; one block per row elsewhere).
#pragma once

#include "../entmax_math.h"
#include "../entmax_rows.h"

#include <cooperative_groups.h>

namespace entmax_cuda {
namespace cuda {

using namespace entmax_cuda::math;
using namespace entmax_cuda::rows;

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------ shuffles of sums

__device__ __forceinline__ float shfl_xor(float v, int offset) { return __shfl_xor_sync(kFullMask, v, offset); }
__device__ __forceinline__ double shfl_xor(double v, int offset) { return __shfl_xor_sync(kFullMask, v, offset); }
__device__ __forceinline__ int shfl_xor(int v, int offset) { return __shfl_xor_sync(kFullMask, v, offset); }

template <typename T>
__device__ __forceinline__ RootSums<T> shfl_xor(const RootSums<T>& s, int offset) {
  return {shfl_xor(s.F, offset), shfl_xor(s.dF, offset), shfl_xor(s.d2F, offset)};
}

template <typename T>
__device__ __forceinline__ BackwardSums<T> shfl_xor(const BackwardSums<T>& s, int offset) {
  BackwardSums<T> r;
  r.g = shfl_xor(s.g, offset); r.g_dy = shfl_xor(s.g_dy, offset);
  r.g_c = shfl_xor(s.g_c, offset); r.g_dy_c = shfl_xor(s.g_dy_c, offset);
  return r;
}

// Sums of the Jensen recount (count, sum of u).
struct CountSum {
  double count, sum;
  __device__ __forceinline__ CountSum operator+(const CountSum& o) const { return {count + o.count, sum + o.sum}; }
};
__device__ __forceinline__ CountSum shfl_xor(const CountSum& s, int offset) {
  return {shfl_xor(s.count, offset), shfl_xor(s.sum, offset)};
}

// A row's max and whether it holds a NaN or +inf.
template <typename T>
struct MaxBad {
  T m;
  int bad;
  __device__ __forceinline__ MaxBad operator+(const MaxBad& o) const { return {m > o.m ? m : o.m, bad | o.bad}; }
};
template <typename T>
__device__ __forceinline__ MaxBad<T> shfl_xor(const MaxBad<T>& s, int offset) {
  return {shfl_xor(s.m, offset), shfl_xor(s.bad, offset)};
}

// ------------------------------------------------------------------ a group of G lanes

// The butterfly combine of v over the G lanes of the group (aligned within the warp); every
// lane ends with the same value. All 32 lanes of the warp must call it (full-mask shuffles).
// `+` is the combine (a sum, or the max of MaxBad).
template <int G, typename T>
__device__ __forceinline__ T group_combine(T v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) v = v + shfl_xor(v, offset);
  return v;
}

template <int G, typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    const T o = shfl_xor(v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// The group's lanes in a 32-bit warp mask, from the group's first lane.
template <int G>
__device__ __forceinline__ unsigned group_lanes(int first_lane) {
  return G == kWarpLanes ? kFullMask : ((1u << G) - 1u) << first_lane;
}

// ------------------------------------------------------------------ a block, a cluster

// Room for the block's warp totals and the cluster's block totals of any reduced type.
constexpr int kReduceSlotBytes = sizeof(BackwardSums<double>);

struct ReduceSlots {
  alignas(16) unsigned char warp[kLongRowWarps][kReduceSlotBytes];
  alignas(16) unsigned char cluster[2][kReduceSlotBytes];  // by the parity of `round`
  int round;                                               // reductions so far (cluster slot parity)
};

template <typename T>
__device__ __forceinline__ T* slot_as(unsigned char* bytes) {
  static_assert(sizeof(T) <= kReduceSlotBytes, "reduce slot too small");
  return reinterpret_cast<T*>(bytes);
}

// Combines v over the block (kLongRowThreads threads), then over the cluster's BLOCKS blocks;
// every thread of every block of the cluster returns the same total. Every thread must call it.
template <int BLOCKS, typename T>
__device__ T reduce_row(T v, ReduceSlots& slots) {
  v = group_combine<kWarpLanes>(v);
  const int warp = threadIdx.x / kWarpLanes;
  if (threadIdx.x % kWarpLanes == 0) *slot_as<T>(slots.warp[warp]) = v;
  __syncthreads();
  T total = *slot_as<T>(slots.warp[0]);
  for (int w = 1; w < kLongRowWarps; ++w) total = total + *slot_as<T>(slots.warp[w]);
  __syncthreads();  // the warp slots are free again
  if constexpr (BLOCKS > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    // Double-buffered by the parity of the round: a block rewrites a slot two reductions
    // later, after every block has passed the cluster barrier in between (so has read it).
    unsigned char* mine = slots.cluster[slots.round & 1];
    if (threadIdx.x == 0) *slot_as<T>(mine) = total;
    cluster.sync();
    total = *slot_as<T>(cluster.map_shared_rank(mine, 0));
    for (int r = 1; r < BLOCKS; ++r) total = total + *slot_as<T>(cluster.map_shared_rank(mine, r));
    __syncthreads();  // every thread read `round` before thread 0 moves it on
    if (threadIdx.x == 0) ++slots.round;
    __syncthreads();
#else
    __trap();  // launchers use clusters only with code built for sm_90+
#endif
  }
  return total;
}

// The block's rank in its cluster (0 without clusters).
template <int BLOCKS>
__device__ __forceinline__ int cluster_rank() {
  if constexpr (BLOCKS > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
    __trap();
#endif
  }
  return 0;
}

// A long-row block's start: its chunk of the row (by its rank in the cluster), and its
// reduction slots ready. Every thread calls it.
template <int BLOCKS>
__device__ __forceinline__ Chunk start_long_row_block(int64_t n, ReduceSlots& slots) {
  if (threadIdx.x == 0) slots.round = 0;
  __syncthreads();
  return long_row_chunk(n, BLOCKS, cluster_rank<BLOCKS>());
}

// Before a block of a cluster exits: no other block may still read its shared memory.
template <int BLOCKS>
__device__ __forceinline__ void cluster_exit_barrier() {
  if constexpr (BLOCKS > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::this_cluster().sync();
#endif
  }
}

}  // namespace cuda
}  // namespace entmax_cuda
