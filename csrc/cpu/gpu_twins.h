// CPU twins of the CUDA kernels (csrc/cuda/*_kernels.cuh): the same steps of entmax_rows.h
// with the lanes of a group, the threads of a block and the blocks of a cluster run one
// after another, their shares combined in the kernels' orders (reduce.cuh: butterfly within
// a group or a warp, the warps in order, the blocks in rank order). They are private ops
// (entmax_cuda::_gpu_twin_forward / _gpu_twin_backward) for the tests, so that the CPU
// exercises the algorithms the GPU runs (plans, candidate compaction, Jensen's start, the
// lockstep root finding, the double pass of alpha > 2 rows, the cluster's chunks) and a
// GPU run only has to confirm the port. Slow by design: rows one by one.
#pragma once

#include "../entmax_math.h"
#include "../entmax_ops.h"
#include "../entmax_rows.h"

#include <torch/csrc/stable/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

namespace entmax_cuda {
namespace twins {
namespace {

using namespace entmax_cuda::math;
using namespace entmax_cuda::rows;

// group_combine<G> / group_max<G> of reduce.cuh: lane l combines its value with lane
// l ^ offset's, offsets G/2 down to 1; every lane ends with the same value.
template <int G, typename T, typename Combine>
T butterfly(T (&v)[G], const Combine& combine) {
  for (int offset = G / 2; offset > 0; offset /= 2) {
    T next[G];
    for (int l = 0; l < G; ++l) next[l] = combine(v[l], v[l ^ offset]);
    for (int l = 0; l < G; ++l) v[l] = next[l];
  }
  return v[0];
}

struct Plus {
  template <typename T>
  T operator()(const T& a, const T& b) const { return a + b; }
};

// reduce_row of reduce.cuh over one block: a butterfly in each warp, the warps in order.
template <typename T>
T block_combine(const std::vector<T>& per_thread) {
  T warps[kLongRowWarps];
  for (int w = 0; w < kLongRowWarps; ++w) {
    T lanes[kWarpLanes];
    for (int l = 0; l < kWarpLanes; ++l) lanes[l] = per_thread[w * kWarpLanes + l];
    warps[w] = butterfly<kWarpLanes>(lanes, Plus());
  }
  T total = warps[0];
  for (int w = 1; w < kLongRowWarps; ++w) total = total + warps[w];
  return total;
}

// ... then the cluster's blocks in rank order.
template <typename T, typename ThreadShare>
T row_combine(int blocks, const ThreadShare& share) {
  std::vector<T> per_thread(kLongRowThreads);
  T total{};
  for (int b = 0; b < blocks; ++b) {
    for (int tid = 0; tid < kLongRowThreads; ++tid) per_thread[tid] = share(b, tid);
    const T block = block_combine(per_thread);
    total = b == 0 ? block : total + block;
  }
  return total;
}

struct CountSum {
  double count, sum;
  CountSum operator+(const CountSum& o) const { return {count + o.count, sum + o.sum}; }
};

// ------------------------------------------------------------------ forward_group_kernel

// solve_group_rows for one row (the kernel's lockstep changes no row's steps); returns
// whether comp_t resolved it (RootFinder::settled).
template <typename comp_t, typename scalar_t, typename acc_t, int G, int K>
bool solve_group_row(scalar_t* yr, int n, const acc_t* value, const uint16_t* index, int c,
                     const unsigned (&candidate_slots)[G], acc_t m_acc, acc_t eps_acc, const acc_t (&sum_u)[G]) {
  const comp_t eps = static_cast<comp_t>(eps_acc), m = static_cast<comp_t>(m_acc);
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  const EntryForm form = entry_form(eps);
  const bool jensen = jensen_applies(eps);
  comp_t lanes_u[G];
  for (int l = 0; l < G; ++l) lanes_u[l] = static_cast<comp_t>(sum_u[l]);
  const comp_t all_u = butterfly<G>(lanes_u, Plus());
  comp_t start = jensen ? jensen_lower_bound(all_u, static_cast<comp_t>(c), eps) : comp_t(0);
  for (int round = 1; round < kJensenRounds; ++round) {
    comp_t sums[G] = {}, counts[G] = {};
    if (jensen) {
      for (int l = 0; l < G; ++l) lane_jensen_share<comp_t, acc_t, G, K>(value, c, l, m, start - inv_eps, sums[l], counts[l]);
    }
    const comp_t sum = butterfly<G>(sums, Plus()), count = butterfly<G>(counts, Plus());
    if (jensen) start = max_(start, jensen_lower_bound(sum, count, eps));
  }
  RootFinder<comp_t> rf(threshold_upper_bound(eps, static_cast<comp_t>(c)), eps, start);
  comp_t p[G][K];
  find_threshold(rf, [&](comp_t t) {
    RootSums<comp_t> shares[G];
    for (int l = 0; l < G; ++l) {
      shares[l] = lane_root_share<comp_t, acc_t, LibMath, G, K>(value, c, l, m, t, eps, inv_eps, form, p[l]);
    }
    return butterfly<G>(shares, Plus());
  });
  if (!std::is_same<comp_t, acc_t>::value) {  // the double pass evaluates its output once more
    for (int l = 0; l < G; ++l) lane_root_share<comp_t, acc_t, LibMath, G, K>(value, c, l, m, rf.t, eps, inv_eps, form, p[l]);
  }
  for (int l = 0; l < G; ++l) {
    lane_write<scalar_t, comp_t, acc_t, G, K>(yr, n, l, candidate_slots[l], acc_t(0), index, c, p[l],
                                              comp_t(1) / rf.F);
  }
  return rf.settled();
}

template <typename scalar_t, int G, int K>
void forward_group_row(const scalar_t* xr, scalar_t* yr, int n, typename AccType<scalar_t>::type alpha) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t v[G][K], lane_max[G];
  bool bad = false;
  for (int l = 0; l < G; ++l) {
    lane_max[l] = neg_inf<acc_t>();
    for (int j = 0; j < K; ++j) {
      const int k = l + j * G;
      v[l][j] = k < n ? static_cast<acc_t>(xr[k]) : neg_inf<acc_t>();
      bad |= is_bad_entry(v[l][j]);
      lane_max[l] = v[l][j] > lane_max[l] ? v[l][j] : lane_max[l];
    }
  }
  const acc_t m = butterfly<G>(lane_max, [](acc_t a, acc_t b) { return b > a ? b : a; });
  const acc_t eps = alpha - acc_t(1);
  const RowKind kind = classify_row(bad, m, eps);
  if (kind == RowKind::kNan || kind == RowKind::kZero) {
    for (int l = 0; l < G; ++l) lane_fill<scalar_t, acc_t, G, K>(yr, n, l, kind == RowKind::kNan ? quiet_nan<acc_t>() : acc_t(0));
    return;
  }
  // The ballot compaction's order: slot j of lanes 0..G-1, then slot j + 1 (= row order).
  acc_t value[G * K];
  uint16_t index[G * K];
  unsigned candidate_slots[G] = {};
  acc_t sum_u[G] = {};
  int c = 0;
  for (int j = 0; j < K; ++j) {
    for (int l = 0; l < G; ++l) {
      const int k = l + j * G;
      if (k < n && is_candidate(v[l][j], m, eps)) {
        value[c] = v[l][j];
        index[c] = static_cast<uint16_t>(k);
        candidate_slots[l] |= 1u << j;
        sum_u[l] += v[l][j] - m;
        ++c;
      }
    }
  }
  // Float rows with alpha > 2, and those float32 does not resolve, in double.
  const bool wide = kind == RowKind::kWide ||
                    (!solve_group_row<acc_t, scalar_t, acc_t, G, K>(yr, n, value, index, c, candidate_slots, m, eps,
                                                                    sum_u) &&
                     std::is_same<acc_t, float>::value);
  if (wide) solve_group_row<double, scalar_t, acc_t, G, K>(yr, n, value, index, c, candidate_slots, m, eps, sum_u);
}

// ------------------------------------------------------------------ forward_long_row_kernel

// Returns whether comp_t resolved the row (RootFinder::settled).
template <typename comp_t, typename scalar_t, typename acc_t>
bool solve_long_row(const std::vector<std::vector<acc_t>>& cache, const std::vector<Chunk>& chunks, scalar_t* yr,
                    comp_t m, comp_t eps) {
  const int blocks = static_cast<int>(chunks.size());
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  const EntryForm form = entry_form(eps);
  auto local = [&](int b) { return Chunk{0, chunks[b].end - chunks[b].begin}; };
  auto count_above = [&](comp_t cut) {
    return row_combine<CountSum>(blocks, [&](int b, int tid) {
      CountSum cs{0, 0};
      thread_jensen_share<comp_t>(cache[b].data(), local(b), tid, kLongRowThreads, m, cut, cs.sum, cs.count);
      return cs;
    });
  };
  const CountSum cs = count_above(eps > comp_t(0) ? -inv_eps : neg_inf<comp_t>());
  const comp_t candidates = static_cast<comp_t>(cs.count);
  comp_t start = 0;
  if (jensen_applies(eps)) {
    start = jensen_lower_bound(static_cast<comp_t>(cs.sum), candidates, eps);
    for (int round = 1; round < kJensenRounds; ++round) {
      const CountSum above = count_above(start - inv_eps);
      start = max_(start, jensen_lower_bound(static_cast<comp_t>(above.sum), static_cast<comp_t>(above.count), eps));
    }
  }
  RootFinder<comp_t> rf(threshold_upper_bound(eps, candidates), eps, start);
  double F = 1;
  find_threshold(rf, [&](comp_t t) {
    const RootSums<double> s = row_combine<RootSums<double>>(blocks, [&](int b, int tid) {
      return thread_root_share<comp_t, LibMath>(cache[b].data(), local(b), tid, kLongRowThreads, m, t, eps, inv_eps,
                                                form);
    });
    F = s.F;
    return RootSums<comp_t>{static_cast<comp_t>(s.F), static_cast<comp_t>(s.dF), static_cast<comp_t>(s.d2F)};
  });
  const comp_t t = rf.t, inv_F = static_cast<comp_t>(1.0 / F);
  for (int b = 0; b < blocks; ++b) {
    for (int64_t k = 0; k < chunks[b].end - chunks[b].begin; ++k) {
      const comp_t u = static_cast<comp_t>(cache[b][k]) - m;
      const bool inside = form == EntryForm::kSoftmax || eps * (u - t) > comp_t(-1);
      yr[chunks[b].begin + k] =
          static_cast<scalar_t>(inside ? entry_terms<comp_t, LibMath>(u, t, eps, inv_eps, form).p * inv_F : comp_t(0));
    }
  }
  return rf.settled();
}

template <typename scalar_t>
void forward_long_row(const scalar_t* xr, scalar_t* yr, int64_t n, typename AccType<scalar_t>::type alpha,
                      int blocks) {
  using acc_t = typename AccType<scalar_t>::type;
  std::vector<Chunk> chunks;
  std::vector<std::vector<acc_t>> cache(blocks);
  acc_t m = neg_inf<acc_t>();
  bool bad = false;
  for (int b = 0; b < blocks; ++b) {
    chunks.push_back(long_row_chunk(n, blocks, b));
    for (int64_t k = chunks[b].begin; k < chunks[b].end; ++k) {
      const acc_t v = static_cast<acc_t>(xr[k]);
      cache[b].push_back(v);
      bad |= is_bad_entry(v);
      m = v > m ? v : m;
    }
  }
  const acc_t eps = alpha - acc_t(1);
  const RowKind kind = classify_row(bad, m, eps);
  if (kind == RowKind::kNan || kind == RowKind::kZero) {
    const acc_t fill = kind == RowKind::kNan ? quiet_nan<acc_t>() : acc_t(0);
    for (int64_t k = 0; k < n; ++k) yr[k] = static_cast<scalar_t>(fill);
  } else if (kind == RowKind::kWide ||
             (!solve_long_row<acc_t>(cache, chunks, yr, m, eps) && std::is_same<acc_t, float>::value)) {
    // Float rows with alpha > 2, and those float32 does not resolve, in double.
    solve_long_row<double>(cache, chunks, yr, static_cast<double>(m), static_cast<double>(eps));
  }
}

// ------------------------------------------------------------------ backward kernels

template <bool ALPHA_GRAD, typename comp_t, typename scalar_t, typename acc_t, int G, int K>
acc_t backward_group_row_in(const acc_t (&p)[G][K], const acc_t (&dy)[G][K], scalar_t* dxr, int n, acc_t eps_acc) {
  const comp_t eps = static_cast<comp_t>(eps_acc);
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  comp_t g[G][K];
  BackwardSums<comp_t> shares[G];
  for (int l = 0; l < G; ++l) {
    shares[l] = lane_backward_share<ALPHA_GRAD, comp_t, acc_t, LibMath, G, K>(p[l], dy[l], n, l, eps, inv_eps,
                                                                             entry_form(eps), g[l]);
  }
  const BackwardSums<comp_t> s = butterfly<G>(shares, Plus());
  const comp_t q = backward_q(s.g, s.g_dy);
  comp_t alpha_shares[G];
  for (int l = 0; l < G; ++l) {
    alpha_shares[l] = lane_backward_output<ALPHA_GRAD, comp_t, scalar_t, acc_t, LibMath, G, K>(
        p[l], dy[l], g[l], dxr, n, l, eps, inv_eps, q, alpha_gradient_center(s, eps));
  }
  return static_cast<acc_t>(ALPHA_GRAD ? butterfly<G>(alpha_shares, Plus()) : comp_t(0));
}

template <bool ALPHA_GRAD, typename scalar_t, int G, int K>
typename AccType<scalar_t>::type backward_group_row(const scalar_t* dyr, const scalar_t* yr, scalar_t* dxr, int n,
                                                    typename AccType<scalar_t>::type alpha) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t p[G][K], d[G][K];
  for (int l = 0; l < G; ++l) {
    for (int j = 0; j < K; ++j) {
      const int k = l + j * G;
      p[l][j] = k < n ? static_cast<acc_t>(yr[k]) : acc_t(0);
      d[l][j] = k < n ? static_cast<acc_t>(dyr[k]) : acc_t(0);
    }
  }
  const acc_t eps = alpha - acc_t(1);
  if (std::is_same<acc_t, float>::value && eps > acc_t(1)) {
    return backward_group_row_in<ALPHA_GRAD, double, scalar_t, acc_t, G, K>(p, d, dxr, n, eps);
  }
  return backward_group_row_in<ALPHA_GRAD, acc_t, scalar_t, acc_t, G, K>(p, d, dxr, n, eps);
}

template <bool ALPHA_GRAD, typename comp_t, typename scalar_t>
double backward_long_row_in(const scalar_t* dyr, const scalar_t* yr, scalar_t* dxr, int64_t n, comp_t eps,
                            int blocks) {
  const comp_t inv_eps = eps > comp_t(0) ? comp_t(1) / eps : comp_t(0);
  const EntryForm form = entry_form(eps);
  const BackwardSums<double> s = row_combine<BackwardSums<double>>(blocks, [&](int b, int tid) {
    const Chunk chunk = long_row_chunk(n, blocks, b);
    return thread_backward_share<ALPHA_GRAD, comp_t, LibMath>(yr + chunk.begin, dyr + chunk.begin,
                                                              Chunk{0, chunk.end - chunk.begin}, tid, kLongRowThreads,
                                                              eps, inv_eps, form);
  });
  const comp_t q = static_cast<comp_t>(backward_q(s.g, s.g_dy));
  const AlphaCenter<comp_t> center = alpha_gradient_center(s, eps);
  const double dalpha = row_combine<double>(blocks, [&](int b, int tid) {
    const Chunk chunk = long_row_chunk(n, blocks, b);
    return thread_backward_output<ALPHA_GRAD, comp_t, LibMath>(yr + chunk.begin, dyr + chunk.begin, dxr + chunk.begin,
                                                               Chunk{0, chunk.end - chunk.begin}, tid,
                                                               kLongRowThreads, eps, inv_eps, form, q, center);
  });
  return ALPHA_GRAD ? dalpha : 0.0;
}

template <bool ALPHA_GRAD, typename scalar_t>
typename AccType<scalar_t>::type backward_long_row(const scalar_t* dyr, const scalar_t* yr, scalar_t* dxr, int64_t n,
                                                   typename AccType<scalar_t>::type alpha, int blocks) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t eps = alpha - acc_t(1);
  if (std::is_same<acc_t, float>::value && eps > acc_t(1)) {
    return static_cast<acc_t>(backward_long_row_in<ALPHA_GRAD, double>(dyr, yr, dxr, n, static_cast<double>(eps), blocks));
  }
  return static_cast<acc_t>(backward_long_row_in<ALPHA_GRAD, acc_t>(dyr, yr, dxr, n, eps, blocks));
}

// ------------------------------------------------------------------ the private ops

void check_twin_args(const Tensor& x, int64_t dim, int64_t blocks_per_row) {
  ENTMAX_CHECK(x.dim() >= 1 && wrap_dim(dim, x.dim()) == x.dim() - 1,
               "entmax_cuda twins: rows along the last dimension only");
  ENTMAX_CHECK(blocks_per_row == 1 || blocks_per_row == 2 || blocks_per_row == 4 || blocks_per_row == 8,
               "entmax_cuda twins: blocks_per_row must be 1, 2, 4 or 8 (the cluster sizes)");
}

}  // namespace
}  // namespace twins

namespace {

// The CUDA forward's plan on the CPU: a group of lanes per row up to kMaxGroupRow entries,
// else `blocks_per_row` blocks per row (the launcher's choice on a GPU, from its SM count).
Tensor gpu_twin_forward_cpu(const Tensor& x, const Tensor& alpha, int64_t dim, int64_t blocks_per_row) {
  ENTMAX_CHECK(x.is_cpu(), "entmax_cuda twins: CPU tensors only");
  twins::check_twin_args(x, dim, blocks_per_row);
  ForwardCall c = forward_call(x, alpha, dim);
  const RowLayout& l = c.layout;
  if (c.x.numel() == 0) return c.y;
  dispatch_float_types(c.x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = c.x.const_data_ptr<scalar_t>();
    const acc_t* ap = c.alpha.const_data_ptr<acc_t>();
    scalar_t* yp = c.y.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < l.rows(); ++r) {
      if (l.n <= rows::kMaxGroupRow) {
        ENTMAX_GROUP_SHAPE_SWITCH(l.n, shape, [&] {
          twins::forward_group_row<scalar_t, shape.lanes, shape.per_lane>(xp + r * l.n, yp + r * l.n,
                                                                          static_cast<int>(l.n), ap[r]);
        });
      } else {
        twins::forward_long_row<scalar_t>(xp + r * l.n, yp + r * l.n, l.n, ap[r], static_cast<int>(blocks_per_row));
      }
    }
  });
  return c.y;
}

std::tuple<Tensor, Tensor> gpu_twin_backward_cpu(const Tensor& dy, const Tensor& y, const Tensor& alpha, int64_t dim,
                                                 bool alpha_grad, int64_t blocks_per_row) {
  ENTMAX_CHECK(y.is_cpu() && dy.is_cpu(), "entmax_cuda twins: CPU tensors only");
  twins::check_twin_args(y, dim, blocks_per_row);
  BackwardCall c = backward_call(dy, y, alpha, dim);
  const RowLayout& l = c.layout;
  if (c.y.numel() == 0) return std::make_tuple(c.dx, c.dalpha);
  dispatch_float_types(c.y.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* dyp = c.dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = c.y.const_data_ptr<scalar_t>();
    const acc_t* ap = c.alpha.const_data_ptr<acc_t>();
    scalar_t* dxp = c.dx.mutable_data_ptr<scalar_t>();
    acc_t* dap = c.dalpha.mutable_data_ptr<acc_t>();
    ENTMAX_BOOL_SWITCH(alpha_grad, kAlphaGrad, [&] {
      for (int64_t r = 0; r < l.rows(); ++r) {
        const int64_t base = r * l.n;
        if (l.n <= rows::kMaxGroupRow) {
          dap[r] = ENTMAX_GROUP_SHAPE_SWITCH(l.n, shape, [&] {
            return twins::backward_group_row<kAlphaGrad, scalar_t, shape.lanes, shape.per_lane>(
                dyp + base, yp + base, dxp + base, static_cast<int>(l.n), ap[r]);
          });
        } else {
          dap[r] = twins::backward_long_row<kAlphaGrad, scalar_t>(dyp + base, yp + base, dxp + base, l.n, ap[r],
                                                                  static_cast<int>(blocks_per_row));
        }
      }
    });
  });
  return std::make_tuple(c.dx, c.dalpha);
}

}  // namespace
}  // namespace entmax_cuda
