// CUDA kernels: one fused forward and one fused backward.
//
// Rows of up to 1024 entries: one warp per row, the row held in registers
// (K entries per lane), every root-finding iteration in registers. Longer
// rows: one block per row, the row cached in shared memory when it fits,
// else re-read from global memory (L2) each iteration.
// All launches go on the current stream; nothing synchronises with the host.
#include "../entmax_math.h"
#include "../entmax_ops.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include <cuda_runtime.h>
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include <tuple>
#include <type_traits>
#include <vector>

namespace entmax_cuda {
namespace {

using namespace entmax_cuda::math;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kBlockThreads = 512;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Pair {
  T a, b;
};
struct PairSum {
  template <typename T>
  __device__ __forceinline__ Pair<T> operator()(const Pair<T>& x, const Pair<T>& y) const {
    return {x.a + y.a, x.b + y.b};
  }
};
struct SumsAdd {
  template <typename T>
  __device__ __forceinline__ BackwardSums<T> operator()(const BackwardSums<T>& x,
                                                        const BackwardSums<T>& y) const {
    return x + y;
  }
};
struct AddOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& x, const T& y) const { return x + y; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& x, const T& y) const { return x > y ? x : y; }
};

// ------------------------------------------------------------ warp helpers
// cub::WarpReduce leaves the result in lane 0; every lane needs it.
template <typename T>
__device__ __forceinline__ T warp_broadcast(T v) { return __shfl_sync(kFullMask, v, 0); }

template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, typename cub::WarpReduce<T>::TempStorage& tmp, Op op) {
  T r = cub::WarpReduce<T>(tmp).Reduce(v, op);
  __syncwarp();
  return warp_broadcast(r);
}

template <typename T>
__device__ __forceinline__ Pair<T> warp_allreduce_pair(Pair<T> v,
                                                       typename cub::WarpReduce<Pair<T>>::TempStorage& tmp) {
  Pair<T> r = cub::WarpReduce<Pair<T>>(tmp).Reduce(v, PairSum());
  __syncwarp();
  return {warp_broadcast(r.a), warp_broadcast(r.b)};
}

template <typename scalar_t>
__device__ __forceinline__ void fill_row_warp(scalar_t* y, int n, int lane, float value) {
  for (int k = lane; k < n; k += kWarpSize) y[k] = static_cast<scalar_t>(value);
}

// ---------------------------------------------------------- warp forward
// Candidates of one row: the entries that can be nonzero (more than 1/eps
// below the max cannot, section 8), compacted into the warp's shared memory.
// For alpha >= 1.5 on attention-like rows that is a few percent of the row, so
// each root-finding iteration costs ceil(c / 32) special-function slots
// instead of K.
template <typename acc_t, int K>
struct WarpCandidates {
  acc_t value[K * kWarpSize];        // raw scores of the candidates
  unsigned short index[K * kWarpSize];  // their positions in the row (n <= 1024)
};

// Root finding over the candidates in arithmetic comp_t (float, or double for
// alpha > 2 rows; see the CPU file). Returns F at the last evaluated threshold
// and that threshold in t_last.
template <typename comp_t, typename acc_t, int K>
__device__ __forceinline__ comp_t solve_row_warp(const WarpCandidates<acc_t, K>& cand, int c, acc_t m,
                                                 comp_t eps, int lane, comp_t& t_last,
                                                 typename cub::WarpReduce<Pair<comp_t>>::TempStorage& tmp) {
  const comp_t inv_eps = comp_t(1) / eps;
  const comp_t mm = static_cast<comp_t>(m);
  RootFinder<comp_t> rf(threshold_upper_bound(eps, static_cast<comp_t>(c)), eps);
  comp_t F = 1;
  for (int it = 0;; ++it) {
    Pair<comp_t> s{comp_t(0), comp_t(0)};
    for (int q = lane; q < c; q += kWarpSize) {
      const EntryAtT<comp_t> e = entry_at_t(static_cast<comp_t>(cand.value[q]) - mm, rf.t, eps, inv_eps);
      s.a += e.p;
      s.b += e.p_over_z;
    }
    s = warp_allreduce_pair<comp_t>(s, tmp);
    F = s.a;
    t_last = rf.t;
    if (rf.update(F, -s.b) || it + 1 >= kMaxRootIterations) break;
  }
  return F;
}

// y = p(t_last) / F on the candidates, 0 elsewhere.
template <typename scalar_t, typename comp_t, typename acc_t, int K>
__device__ __forceinline__ void write_row_warp(scalar_t* yr, int n, const WarpCandidates<acc_t, K>& cand, int c,
                                               acc_t m, comp_t eps, comp_t t, comp_t F, int lane) {
  fill_row_warp(yr, n, lane, 0.f);
  __syncwarp();
  const comp_t inv_eps = comp_t(1) / eps, inv_F = comp_t(1) / F;
  for (int q = lane; q < c; q += kWarpSize) {
    const comp_t u = static_cast<comp_t>(cand.value[q]) - static_cast<comp_t>(m);
    yr[cand.index[q]] = static_cast<scalar_t>(entry_at_t(u, t, eps, inv_eps).p * inv_F);
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    forward_warp_kernel(const scalar_t* __restrict__ x, const typename AccType<scalar_t>::type* __restrict__ alpha,
                        scalar_t* __restrict__ y, int64_t rows, int n) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ typename cub::WarpReduce<acc_t>::TempStorage tmp_scalar[kWarpsPerBlock];
  __shared__ typename cub::WarpReduce<Pair<acc_t>>::TempStorage tmp_pair[kWarpsPerBlock];
  __shared__ typename cub::WarpReduce<Pair<double>>::TempStorage tmp_pair_wide[kWarpsPerBlock];
  __shared__ WarpCandidates<acc_t, K> candidates[kWarpsPerBlock];
  const int lane = threadIdx.x, warp = threadIdx.y;
  WarpCandidates<acc_t, K>& cand = candidates[warp];

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const scalar_t* xr = x + row * n;
    scalar_t* yr = y + row * n;
    acc_t v[K];
    acc_t m = neg_inf<acc_t>();
    bool bad = false;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int k = lane + j * kWarpSize;
      v[j] = k < n ? static_cast<acc_t>(xr[k]) : neg_inf<acc_t>();
      bad |= (v[j] != v[j]) || v[j] == -neg_inf<acc_t>();
      m = v[j] > m ? v[j] : m;
    }
    m = warp_allreduce(m, tmp_scalar[warp], MaxOp());
    const acc_t eps = alpha[row] - acc_t(1);
    bad = __any_sync(kFullMask, bad) || !(eps >= acc_t(0)) || eps == -neg_inf<acc_t>();
    if (bad) { fill_row_warp(yr, n, lane, quiet_nan<float>()); continue; }
    if (m == neg_inf<acc_t>()) { fill_row_warp(yr, n, lane, 0.f); continue; }

    if (eps == acc_t(0)) {  // softmax, in registers
      acc_t p[K];
      acc_t s = 0;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        p[j] = exp_(v[j] - m);
        s += p[j];
      }
      const acc_t inv_F = acc_t(1) / warp_allreduce(s, tmp_scalar[warp], AddOp());
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int k = lane + j * kWarpSize;
        if (k < n) yr[k] = static_cast<scalar_t>(p[j] * inv_F);
      }
      continue;
    }

    // Compact the candidates (in row order) into shared memory.
    const bool wide = std::is_same<acc_t, float>::value && eps > acc_t(1);
    const double cutoff = -1.0 / static_cast<double>(eps);
    int c = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int k = lane + j * kWarpSize;
      const bool is_cand = k < n && static_cast<double>(v[j]) - static_cast<double>(m) > cutoff;
      const unsigned mask = __ballot_sync(kFullMask, is_cand);
      if (is_cand) {
        const int pos = c + __popc(mask & ((1u << lane) - 1u));
        cand.value[pos] = v[j];
        cand.index[pos] = static_cast<unsigned short>(k);
      }
      c += __popc(mask);
    }
    __syncwarp();
    if (wide) {
      double t = 0;
      const double F = solve_row_warp<double, acc_t, K>(cand, c, m, double(eps), lane, t, tmp_pair_wide[warp]);
      write_row_warp<scalar_t, double, acc_t, K>(yr, n, cand, c, m, double(eps), t, F, lane);
    } else {
      acc_t t = 0;
      const acc_t F = solve_row_warp<acc_t, acc_t, K>(cand, c, m, eps, lane, t, tmp_pair[warp]);
      write_row_warp<scalar_t, acc_t, acc_t, K>(yr, n, cand, c, m, eps, t, F, lane);
    }
    __syncwarp();  // the candidates are rewritten by the warp's next row
  }
}

// --------------------------------------------------------- block forward
template <typename T>
__device__ __forceinline__ T block_broadcast(T v, T* slot) {
  if (threadIdx.x == 0) *slot = v;
  __syncthreads();
  T r = *slot;
  __syncthreads();
  return r;
}

// A thread's share of a long row's sum: float partial sums of 32 terms flushed
// into a double, so a million-entry row keeps float32's last digit (a plain
// float running sum over ~2000 terms per thread loses ~1e-4 relative).
struct ChunkedSum {
  double total = 0;
  float part = 0;
  int count = 0;
  __device__ __forceinline__ void add(float v) {
    part += v;
    if (++count == 32) { total += part; part = 0; count = 0; }
  }
  __device__ __forceinline__ void add(double v) { total += v; }
  __device__ __forceinline__ double value() const { return total + part; }
};

// One entry of a long row: from the shared-memory cache or from global memory.
template <typename scalar_t, typename acc_t, bool CACHED>
__device__ __forceinline__ acc_t row_value(const scalar_t* xr, const acc_t* cache, int64_t k) {
  return CACHED ? cache[k] : static_cast<acc_t>(xr[k]);
}

template <typename scalar_t, typename comp_t, bool CACHED>
__device__ comp_t solve_row_block(const scalar_t* xr, const typename AccType<scalar_t>::type* cache,
                                  int64_t n, comp_t m, comp_t eps, comp_t& t_final) {
  using acc_t = typename AccType<scalar_t>::type;
  using PairReduce = cub::BlockReduce<Pair<double>, kBlockThreads>;
  using CountReduce = cub::BlockReduce<int64_t, kBlockThreads>;
  __shared__ typename PairReduce::TempStorage tmp;
  __shared__ typename CountReduce::TempStorage tmp_count;
  __shared__ Pair<double> slot;
  __shared__ int64_t count_slot;
  const comp_t inv_eps = comp_t(1) / eps;

  int64_t c = 0;
  for (int64_t k = threadIdx.x; k < n; k += kBlockThreads) {
    c += static_cast<comp_t>(row_value<scalar_t, acc_t, CACHED>(xr, cache, k)) - m > -inv_eps;
  }
  c = block_broadcast(CountReduce(tmp_count).Sum(c), &count_slot);

  RootFinder<comp_t> rf(threshold_upper_bound(eps, static_cast<comp_t>(c)), eps);
  comp_t F = 1;
  for (int it = 0;; ++it) {
    ChunkedSum sum_p, sum_p_over_z;
    for (int64_t k = threadIdx.x; k < n; k += kBlockThreads) {
      const comp_t u = static_cast<comp_t>(row_value<scalar_t, acc_t, CACHED>(xr, cache, k)) - m;
      if (u <= -inv_eps) continue;  // zero for every t >= 0: no special functions
      const EntryAtT<comp_t> e = entry_at_t(u, rf.t, eps, inv_eps);
      sum_p.add(e.p);
      sum_p_over_z.add(e.p_over_z);
    }
    const Pair<double> s = block_broadcast(
        PairReduce(tmp).Reduce(Pair<double>{sum_p.value(), sum_p_over_z.value()}, PairSum()), &slot);
    F = static_cast<comp_t>(s.a);
    t_final = rf.t;
    if (rf.update(F, static_cast<comp_t>(-s.b)) || it + 1 >= kMaxRootIterations) break;
  }
  return F;
}

template <typename scalar_t, typename comp_t, bool CACHED>
__device__ void write_row_block(const scalar_t* xr, const typename AccType<scalar_t>::type* cache,
                                scalar_t* yr, int64_t n, comp_t m, comp_t eps, comp_t t, comp_t F) {
  using acc_t = typename AccType<scalar_t>::type;
  const comp_t inv_eps = comp_t(1) / eps, inv_F = comp_t(1) / F;
  for (int64_t k = threadIdx.x; k < n; k += kBlockThreads) {
    const comp_t u = static_cast<comp_t>(row_value<scalar_t, acc_t, CACHED>(xr, cache, k)) - m;
    yr[k] = static_cast<scalar_t>(entry_at_t(u, t, eps, inv_eps).p * inv_F);
  }
}

template <typename scalar_t, bool CACHED>
__global__ void __launch_bounds__(kBlockThreads)
    forward_block_kernel(const scalar_t* __restrict__ x, const typename AccType<scalar_t>::type* __restrict__ alpha,
                         scalar_t* __restrict__ y, int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  using MaxReduce = cub::BlockReduce<acc_t, kBlockThreads>;
  using SumReduce = cub::BlockReduce<double, kBlockThreads>;
  __shared__ typename MaxReduce::TempStorage tmp;
  __shared__ typename SumReduce::TempStorage tmp_sum;
  __shared__ acc_t slot;
  __shared__ double sum_slot;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  acc_t* cache = reinterpret_cast<acc_t*>(dynamic_smem);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* xr = x + row * n;
    scalar_t* yr = y + row * n;
    acc_t m = neg_inf<acc_t>();
    int bad = 0;
    for (int64_t k = threadIdx.x; k < n; k += kBlockThreads) {
      const acc_t v = static_cast<acc_t>(xr[k]);
      if (CACHED) cache[k] = v;
      bad |= (v != v) || v == -neg_inf<acc_t>();
      m = v > m ? v : m;
    }
    m = block_broadcast(MaxReduce(tmp).Reduce(m, MaxOp()), &slot);
    const acc_t eps = alpha[row] - acc_t(1);
    bad = __syncthreads_or(bad) || !(eps >= acc_t(0)) || eps == -neg_inf<acc_t>();
    if (bad || m == neg_inf<acc_t>()) {
      const acc_t fill = bad ? quiet_nan<acc_t>() : acc_t(0);
      for (int64_t k = threadIdx.x; k < n; k += kBlockThreads) yr[k] = static_cast<scalar_t>(fill);
      __syncthreads();
      continue;
    }
    if (eps == acc_t(0)) {  // softmax
      ChunkedSum s;
      for (int64_t k = threadIdx.x; k < n; k += kBlockThreads)
        s.add(exp_(row_value<scalar_t, acc_t, CACHED>(xr, cache, k) - m));
      const acc_t inv = static_cast<acc_t>(1.0 / block_broadcast(SumReduce(tmp_sum).Sum(s.value()), &sum_slot));
      for (int64_t k = threadIdx.x; k < n; k += kBlockThreads)
        yr[k] = static_cast<scalar_t>(exp_(row_value<scalar_t, acc_t, CACHED>(xr, cache, k) - m) * inv);
    } else if (std::is_same<acc_t, float>::value && eps > acc_t(1)) {
      double t = 0;
      const double F = solve_row_block<scalar_t, double, CACHED>(xr, cache, n, double(m), double(eps), t);
      write_row_block<scalar_t, double, CACHED>(xr, cache, yr, n, double(m), double(eps), t, F);
    } else {
      acc_t t = 0;
      const acc_t F = solve_row_block<scalar_t, acc_t, CACHED>(xr, cache, n, m, eps, t);
      write_row_block<scalar_t, acc_t, CACHED>(xr, cache, yr, n, m, eps, t, F);
    }
    __syncthreads();  // the cache is rewritten by the next row
  }
}

// -------------------------------------------------------------- backward
template <typename T>
__device__ __forceinline__ BackwardSums<T> broadcast_sums_warp(const BackwardSums<T>& s) {
  BackwardSums<T> r;
  r.g = warp_broadcast(s.g); r.g_dy = warp_broadcast(s.g_dy); r.p_l = warp_broadcast(s.p_l);
  r.p_v = warp_broadcast(s.p_v); r.p_v_l = warp_broadcast(s.p_v_l); r.g_w = warp_broadcast(s.g_w);
  r.g_r = warp_broadcast(s.g_r); r.dy_g_rwl = warp_broadcast(s.dy_g_rwl);
  return r;
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    backward_warp_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                         const typename AccType<scalar_t>::type* __restrict__ alpha, scalar_t* __restrict__ dx,
                         typename AccType<scalar_t>::type* __restrict__ dalpha, int64_t rows, int n) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ typename cub::WarpReduce<BackwardSums<acc_t>>::TempStorage tmp[kWarpsPerBlock];
  const int lane = threadIdx.x, warp = threadIdx.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t base = row * n;
    const acc_t eps = alpha[row] - acc_t(1);
    acc_t g[K], d[K];
    BackwardSums<acc_t> s;
    s.zero();
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int k = lane + j * kWarpSize;
      d[j] = k < n ? static_cast<acc_t>(dy[base + k]) : acc_t(0);
      const acc_t pk = k < n ? static_cast<acc_t>(y[base + k]) : acc_t(0);
      g[j] = accumulate_backward_entry(pk, d[j], eps, s);
    }
    s = cub::WarpReduce<BackwardSums<acc_t>>(tmp[warp]).Reduce(s, SumsAdd());
    __syncwarp();
    s = broadcast_sums_warp(s);
    const acc_t q = backward_q(s.g, s.g_dy);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int k = lane + j * kWarpSize;
      if (k < n) dx[base + k] = static_cast<scalar_t>(g[j] * (d[j] - q));
    }
    if (lane == 0) dalpha[row] = alpha_gradient(s, eps);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    backward_block_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                          const typename AccType<scalar_t>::type* __restrict__ alpha, scalar_t* __restrict__ dx,
                          typename AccType<scalar_t>::type* __restrict__ dalpha, int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  using SumsReduce = cub::BlockReduce<BackwardSums<double>, kBlockThreads>;
  __shared__ typename SumsReduce::TempStorage tmp;
  __shared__ BackwardSums<double> slot;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * n;
    const acc_t eps = alpha[row] - acc_t(1);
    // float partial sums of 32 entries, flushed into double (see ChunkedSum)
    BackwardSums<acc_t> part;
    BackwardSums<double> total;
    part.zero();
    total.zero();
    int count = 0;
    for (int64_t k = threadIdx.x; k < n; k += kBlockThreads) {
      accumulate_backward_entry(static_cast<acc_t>(y[base + k]), static_cast<acc_t>(dy[base + k]), eps, part);
      if (++count == 32) {
        total = total + widen(part);
        part.zero();
        count = 0;
      }
    }
    total = total + widen(part);
    const BackwardSums<double> s = block_broadcast(SumsReduce(tmp).Reduce(total, SumsAdd()), &slot);
    const acc_t q = static_cast<acc_t>(backward_q(s.g, s.g_dy));
    for (int64_t k = threadIdx.x; k < n; k += kBlockThreads) {
      const acc_t g = support_weight(static_cast<acc_t>(y[base + k]), eps);
      dx[base + k] = static_cast<scalar_t>(g * (static_cast<acc_t>(dy[base + k]) - q));
    }
    if (threadIdx.x == 0) dalpha[row] = static_cast<acc_t>(alpha_gradient(s, static_cast<double>(eps)));
  }
}

// --------------------------------------------------------------- launchers
cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  ENTMAX_CHECK(err == cudaSuccess, "entmax_cuda: ", what, " launch failed: ", cudaGetErrorString(err));
}

int64_t grid_for(int64_t blocks) { return std::min<int64_t>(std::max<int64_t>(blocks, 1), 1 << 20); }

// Largest dynamic shared memory a block may opt in to on the current device.
int max_dynamic_smem(int device) {
  int bytes = 0;
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return bytes;
}

template <typename scalar_t>
void launch_forward(const Tensor& x, const Tensor& alpha, Tensor& y, int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const cudaStream_t stream = current_stream(x);
  const dim3 warp_block(kWarpSize, kWarpsPerBlock);
  const int64_t warp_grid = grid_for((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (n <= 4 * kWarpSize) {
    forward_warp_kernel<scalar_t, 4><<<warp_grid, warp_block, 0, stream>>>(xp, ap, yp, rows, int(n));
  } else if (n <= 16 * kWarpSize) {
    forward_warp_kernel<scalar_t, 16><<<warp_grid, warp_block, 0, stream>>>(xp, ap, yp, rows, int(n));
  } else if (n <= 32 * kWarpSize) {
    forward_warp_kernel<scalar_t, 32><<<warp_grid, warp_block, 0, stream>>>(xp, ap, yp, rows, int(n));
  } else {
    const int64_t smem = n * static_cast<int64_t>(sizeof(acc_t));
    constexpr int64_t kStaticSmemMargin = 8 * 1024;  // the kernel's own reduction storage
    if (smem + kStaticSmemMargin <= max_dynamic_smem(x.get_device_index())) {
      auto kernel = forward_block_kernel<scalar_t, true>;
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      kernel<<<grid_for(rows), kBlockThreads, smem, stream>>>(xp, ap, yp, rows, n);
    } else {
      forward_block_kernel<scalar_t, false><<<grid_for(rows), kBlockThreads, 0, stream>>>(xp, ap, yp, rows, n);
    }
  }
  check_launch("entmax forward");
}

template <typename scalar_t>
void launch_backward(const Tensor& dy, const Tensor& y, const Tensor& alpha, Tensor& dx, Tensor& dalpha,
                     int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  acc_t* dap = dalpha.mutable_data_ptr<acc_t>();
  const cudaStream_t stream = current_stream(y);
  const dim3 warp_block(kWarpSize, kWarpsPerBlock);
  const int64_t warp_grid = grid_for((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (n <= 4 * kWarpSize) {
    backward_warp_kernel<scalar_t, 4><<<warp_grid, warp_block, 0, stream>>>(dyp, yp, ap, dxp, dap, rows, int(n));
  } else if (n <= 16 * kWarpSize) {
    backward_warp_kernel<scalar_t, 16><<<warp_grid, warp_block, 0, stream>>>(dyp, yp, ap, dxp, dap, rows, int(n));
  } else if (n <= 32 * kWarpSize) {
    backward_warp_kernel<scalar_t, 32><<<warp_grid, warp_block, 0, stream>>>(dyp, yp, ap, dxp, dap, rows, int(n));
  } else {
    backward_block_kernel<scalar_t><<<grid_for(rows), kBlockThreads, 0, stream>>>(dyp, yp, ap, dxp, dap, rows, n);
  }
  check_launch("entmax backward");
}

// The kernels work on rows that are contiguous in memory. When dim is not the
// innermost axis, move it there (adjacent transposes keep the other axes in
// order, so row r still pairs with alpha's flat entry r) and move it back after.
Tensor dim_to_last(const Tensor& t, int64_t dim) {
  Tensor r = t;
  for (int64_t d = dim; d + 1 < t.dim(); ++d) r = torch::stable::transpose(r, d, d + 1);
  return torch::stable::contiguous(r);
}

Tensor last_to_dim(const Tensor& t, int64_t dim) {
  Tensor r = t;
  for (int64_t d = t.dim() - 2; d >= dim; --d) r = torch::stable::transpose(r, d, d + 1);
  return torch::stable::contiguous(r);
}

Tensor entmax_forward_cuda(const Tensor& x_in, const Tensor& alpha_in, int64_t dim) {
  check_input(x_in, "x");
  ENTMAX_CHECK(x_in.is_cuda(), "entmax_forward_cuda: x must be a CUDA tensor");
  dim = wrap_dim(dim, x_in.dim());
  check_rows_tensor(x_in, alpha_in, dim, "alpha");
  const torch::stable::accelerator::DeviceGuard guard(x_in.get_device_index());
  const RowLayout l = row_layout(x_in, dim);
  const bool move = l.inner > 1;
  const Tensor x = move ? dim_to_last(x_in, dim) : torch::stable::contiguous(x_in);
  const Tensor alpha = torch::stable::contiguous(alpha_in);
  Tensor y = torch::stable::empty_like(x);
  if (x.numel() > 0) {
    dispatch_float_types(x.scalar_type(), [&](auto tag) {
      launch_forward<decltype(tag)>(x, alpha, y, l.rows(), l.n);
    });
  }
  return move ? last_to_dim(y, dim) : y;
}

std::tuple<Tensor, Tensor> entmax_backward_cuda(const Tensor& dy_in, const Tensor& y_in, const Tensor& alpha_in,
                                                int64_t dim) {
  ENTMAX_CHECK(y_in.is_cuda() && dy_in.is_cuda(), "entmax_backward_cuda: tensors must be CUDA tensors");
  dim = wrap_dim(dim, y_in.dim());
  check_backward_args(dy_in, y_in, alpha_in, dim);
  const torch::stable::accelerator::DeviceGuard guard(y_in.get_device_index());
  const RowLayout l = row_layout(y_in, dim);
  const bool move = l.inner > 1;
  const Tensor dy = move ? dim_to_last(dy_in, dim) : torch::stable::contiguous(dy_in);
  const Tensor y = move ? dim_to_last(y_in, dim) : torch::stable::contiguous(y_in);
  const Tensor alpha = torch::stable::contiguous(alpha_in);
  Tensor dx = torch::stable::empty_like(y);
  Tensor dalpha = torch::stable::empty_like(alpha);
  if (y.numel() == 0) {
    torch::stable::zero_(dalpha);
  } else {
    dispatch_float_types(y.scalar_type(), [&](auto tag) {
      launch_backward<decltype(tag)>(dy, y, alpha, dx, dalpha, l.rows(), l.n);
    });
  }
  return std::make_tuple(move ? last_to_dim(dx, dim) : dx, dalpha);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda, CUDA, m) {
  m.impl("entmax_forward", TORCH_BOX(&entmax_cuda::entmax_forward_cuda));
  m.impl("entmax_backward", TORCH_BOX(&entmax_cuda::entmax_backward_cuda));
}
