// CUDA backward kernels (no torch here), the steps of entmax_rows.h (twins: cpu/gpu_twins.h).
// ALPHA_GRAD = false: only sum g and sum g dy are formed (the x-gradient), dalpha is 0.
//  - backward_group_kernel<G, K>: rows of up to G * K <= 1024 entries, a group of G lanes
//    per row, p and dy read once into registers, dX written once;
//  - backward_long_row_kernel<BLOCKS>: a block (or a cluster of BLOCKS blocks) per row:
//    one pass for the sums, one for dX (and the alpha-gradient's centred sum).
// Float rows with alpha > 2 run in double, as their forward (their weights g = p^(2-alpha)
// at the support edge are huge).
#pragma once

#include "reduce.cuh"

#include <type_traits>

namespace entmax_cuda {
namespace cuda {

// dX and dalpha of the group rows of this pass (`mine`), in arithmetic comp_t. Every lane
// of the warp calls it (lockstep shuffles).
template <bool ALPHA_GRAD, typename comp_t, typename scalar_t, typename acc_t, int G, int K>
__device__ __forceinline__ void backward_group_rows(bool mine, const acc_t (&p)[K], const acc_t (&dy)[K],
                                                    scalar_t* __restrict__ dxr, acc_t* __restrict__ dalpha_row, int n,
                                                    int lane, acc_t eps_acc) {
  const comp_t eps = static_cast<comp_t>(eps_acc);
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  comp_t g[K];
  const int n_mine = mine ? n : 0;
  const BackwardSums<comp_t> s = group_combine<G>(lane_backward_share<ALPHA_GRAD, comp_t, acc_t, LibMath, G, K>(
      p, dy, n_mine, lane, eps, inv_eps, entry_form(eps), g));
  const comp_t q = backward_q(s.g, s.g_dy);
  const comp_t share = lane_backward_output<ALPHA_GRAD, comp_t, scalar_t, acc_t, LibMath, G, K>(
      p, dy, g, dxr, n_mine, lane, eps, inv_eps, q, alpha_gradient_center(s, eps));
  const comp_t dalpha = ALPHA_GRAD ? group_combine<G>(share) : comp_t(0);
  if (mine && lane == 0) *dalpha_row = static_cast<acc_t>(dalpha);
}

// Loads the lane's entries of a row (zeros past n).
template <typename scalar_t, typename acc_t, int G, int K>
__device__ __forceinline__ void load_lane(const scalar_t* __restrict__ src, int n, int lane, acc_t (&out)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int k = lane + j * G;
    out[j] = k < n ? static_cast<acc_t>(src[k]) : acc_t(0);
  }
}

// The double pass, out of line (rare, and its double special functions would otherwise
// raise every row's register budget); it reloads its entries rather than take the
// caller's registers by reference (which would put them in local memory).
template <bool ALPHA_GRAD, typename scalar_t, typename acc_t, int G, int K>
__device__ __noinline__ void backward_wide_group_rows(bool mine, const scalar_t* __restrict__ yr,
                                                      const scalar_t* __restrict__ dyr, scalar_t* __restrict__ dxr,
                                                      acc_t* __restrict__ dalpha_row, int n, int lane, acc_t eps) {
  acc_t p[K], d[K];
  load_lane<scalar_t, acc_t, G, K>(yr, mine ? n : 0, lane, p);
  load_lane<scalar_t, acc_t, G, K>(dyr, mine ? n : 0, lane, d);
  backward_group_rows<ALPHA_GRAD, double, scalar_t, acc_t, G, K>(mine, p, d, dxr, dalpha_row, n, lane, eps);
}

template <typename scalar_t, int G, int K, bool ALPHA_GRAD>
__global__ void __launch_bounds__(kGroupBlockThreads, kGroupMinBlocksPerSM)
    backward_group_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                          const typename AccType<scalar_t>::type* __restrict__ alpha, scalar_t* __restrict__ dx,
                          typename AccType<scalar_t>::type* __restrict__ dalpha, int64_t rows, int n) {
  using acc_t = typename AccType<scalar_t>::type;
  static_assert(kWarpLanes % G == 0 && K <= 32 && G * K <= kMaxGroupRow, "group shape");
  constexpr int kGroups = kGroupBlockThreads / G;
  const int lane = threadIdx.x % G, group = threadIdx.x / G;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kGroups; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t row = first + group;
    const bool live = row < rows;
    const int64_t base = (live ? row : 0) * n;
    acc_t p[K], d[K];
    load_lane<scalar_t, acc_t, G, K>(y + base, live ? n : 0, lane, p);
    load_lane<scalar_t, acc_t, G, K>(dy + base, live ? n : 0, lane, d);
    const acc_t eps = live ? alpha[row] - acc_t(1) : acc_t(0);
    const bool wide = std::is_same<acc_t, float>::value && eps > acc_t(1);
    acc_t* dalpha_row = dalpha + (live ? row : 0);
    backward_group_rows<ALPHA_GRAD, acc_t, scalar_t, acc_t, G, K>(live && !wide, p, d, dx + base, dalpha_row, n, lane, eps);
    if constexpr (std::is_same<acc_t, float>::value) {
      if (__any_sync(kFullMask, live && wide)) {
        backward_wide_group_rows<ALPHA_GRAD, scalar_t, acc_t, G, K>(live && wide, y + base, dy + base, dx + base,
                                                                    dalpha_row, n, lane, eps);
      }
    }
  }
}

// dX and dalpha of a long row's chunk in arithmetic comp_t.
template <bool ALPHA_GRAD, int BLOCKS, typename comp_t, typename scalar_t, typename acc_t>
__device__ void backward_long_row(const scalar_t* __restrict__ pr, const scalar_t* __restrict__ dyr,
                                  scalar_t* __restrict__ dxr, acc_t* __restrict__ dalpha_row, int64_t len,
                                  comp_t eps, ReduceSlots& slots) {
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  const EntryForm form = entry_form(eps);
  const BackwardSums<double> s = reduce_row<BLOCKS>(
      thread_backward_share<ALPHA_GRAD, comp_t, LibMath>(pr, dyr, Chunk{0, len}, threadIdx.x, kLongRowThreads, eps,
                                                         inv_eps, form),
      slots);
  const comp_t q = static_cast<comp_t>(backward_q(s.g, s.g_dy));
  const AlphaCenter<comp_t> center = alpha_gradient_center(s, eps);
  double dalpha = thread_backward_output<ALPHA_GRAD, comp_t, LibMath>(pr, dyr, dxr, Chunk{0, len}, threadIdx.x,
                                                                      kLongRowThreads, eps, inv_eps, form, q, center);
  if (ALPHA_GRAD) dalpha = reduce_row<BLOCKS>(dalpha, slots);
  if (cluster_rank<BLOCKS>() == 0 && threadIdx.x == 0) *dalpha_row = static_cast<acc_t>(ALPHA_GRAD ? dalpha : 0.0);
}

template <typename scalar_t, bool ALPHA_GRAD, int BLOCKS>
__global__ void __launch_bounds__(kLongRowThreads)
    backward_long_row_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                             const typename AccType<scalar_t>::type* __restrict__ alpha, scalar_t* __restrict__ dx,
                             typename AccType<scalar_t>::type* __restrict__ dalpha, int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ ReduceSlots slots;
  const Chunk chunk = start_long_row_block<BLOCKS>(n, slots);
  const int64_t len = chunk.end - chunk.begin;
  for (int64_t row = blockIdx.x / BLOCKS; row < rows; row += gridDim.x / BLOCKS) {
    const int64_t base = row * n + chunk.begin;
    const acc_t eps = alpha[row] - acc_t(1);
    if (std::is_same<acc_t, float>::value && eps > acc_t(1)) {
      backward_long_row<ALPHA_GRAD, BLOCKS, double>(y + base, dy + base, dx + base, dalpha + row, len,
                                                    static_cast<double>(eps), slots);
    } else {
      backward_long_row<ALPHA_GRAD, BLOCKS, acc_t>(y + base, dy + base, dx + base, dalpha + row, len, eps, slots);
    }
  }
  cluster_exit_barrier<BLOCKS>();
}

}  // namespace cuda
}  // namespace entmax_cuda
