// CPU kernels: rows in parallel (torch's parallel_for, OpenMP), one fused
// forward and one fused backward per row, the math from entmax_math.h.
#include "../entmax_math.h"
#include "../entmax_ops.h"
#include "vector_math.h"

#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

namespace entmax_cuda {
namespace {

using namespace entmax_cuda::math;

// The float32 hot loops, vectorised: compiled for AVX-512, AVX2 and baseline
// x86-64, the CPU picks at load time (GCC function multi-versioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENTMAX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENTMAX_CPU_CLONES
#endif

// p_j = exp(x_j - m); returns sum p (in double).
ENTMAX_CPU_CLONES
double exp_shifted_f32(const float* x, float* p, int64_t n, float m) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = vmath::exp_f32(x[j] - m);
    p[j] = e;
    sum += e;
  }
  return sum;
}

// Sums over a row are vector float partial sums over chunks of kSumChunk
// entries (at most 16 terms per lane), flushed into double: float-speed
// loops, no per-entry conversion, and a row's rounding stays below 1 ulp.
constexpr int64_t kSumChunk = 256;

// The candidates at threshold t (entry_at_t of entmax_math.h, vectorised):
// p_j, and the sums F = sum p, -F' = sum p / z.
__attribute__((always_inline)) inline void evaluate_f32(const float* u, float* p, int64_t c, float t, float eps,
                                                       float inv_eps, double* F, double* minus_dF) {
  double sp = 0, sdz = 0;
  for (int64_t j0 = 0; j0 < c; j0 += kSumChunk) {
    const int64_t j1 = std::min(c, j0 + kSumChunk);
    float fp = 0, fdz = 0;
#pragma omp simd reduction(+ : fp, fdz)
    for (int64_t j = j0; j < j1; ++j) {
      const float a = eps * (u[j] - t);
      const bool valid = a > -1.0f;
      const float as = valid ? a : 0.0f;
      const float e = vmath::exp_f32(vmath::log1p_f32(as) * inv_eps);
      const float pe = valid ? e : 0.0f;
      p[j] = pe;
      fp += pe;
      fdz += pe / (1.0f + as);
    }
    sp += fp;
    sdz += fdz;
  }
  *F = sp;
  *minus_dF = sdz;
}

// The backward sums of one row (accumulate_backward_entry of entmax_math.h,
// vectorised; eps > 0). Writes g; returns false if the row holds a NaN (the
// caller then takes the scalar path, which propagates it).
ENTMAX_CPU_CLONES
bool backward_sums_f32(const float* p, const float* dy, float* g_out, int64_t n, float eps, BackwardSums<double>& out) {
  out.zero();
  int nan = 0;
  const float inv_eps = 1.0f / eps, inv_eps2 = inv_eps * inv_eps;
  const float series_limit = Tolerance<float>::series_limit;
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    float s_g = 0, s_g_dy = 0, s_p_l = 0, s_p_v = 0, s_p_v_l = 0, s_g_w = 0, s_g_r = 0, s_dy_g_rwl = 0;
#pragma omp simd reduction(+ : s_g, s_g_dy, s_p_l, s_p_v, s_p_v_l, s_g_w, s_g_r, s_dy_g_rwl) reduction(| : nan)
    for (int64_t k = k0; k < k1; ++k) {
      const float pk = p[k], d = dy[k];
      nan |= (pk != pk) | (d != d);
      const bool on = pk > 0.0f;
      const float l = on ? vmath::log_f32(pk < 1.17549435e-38f ? 1.17549435e-38f : pk) : 0.0f;
      const float x = eps * l;
      const float e = vmath::expm1_f32(x);
      const float g = on ? pk / (1.0f + e) : 0.0f;
      const float w = e * inv_eps;
      const float v = -w / (1.0f + e);
      const float r_series = l * l * 0.5f * expm1_minus_x_ratio(x);
      const float r_direct = (e - x) * inv_eps2;
      const float r = (x > -series_limit && x < series_limit) ? r_series : r_direct;
      const float pv = on ? pk * v : 0.0f;
      g_out[k] = g;
      s_g += g;
      s_g_dy += g * d;
      s_p_l += pk * l;
      s_p_v += pv;
      s_p_v_l += pv * l;
      s_g_w += g * w;
      s_g_r += g * r;
      s_dy_g_rwl += d * g * (r - w * l);
    }
    out.g += s_g; out.g_dy += s_g_dy; out.p_l += s_p_l; out.p_v += s_p_v;
    out.p_v_l += s_p_v_l; out.g_w += s_g_w; out.g_r += s_g_r; out.dy_g_rwl += s_dy_g_rwl;
  }
  return nan == 0;
}

// The vector loops run over a multiple of kPad entries (padding that adds
// exactly 0): short rows then need no scalar remainder loop.
constexpr int64_t kPad = 16;
inline int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// The whole root finding of one float row over its candidates u[0, c) (padded
// to whole vectors with -inf), in one multi-versioned function so that the
// vector loop is inlined into the iteration. Leaves p at the last evaluated
// threshold; returns 1 / F there.
ENTMAX_CPU_CLONES
float solve_candidates_f32(const float* u, float* p, int64_t c, float eps) {
  const float inv_eps = 1.0f / eps;
  RootFinder<float> rf(threshold_upper_bound(eps, static_cast<float>(c)), eps);
  float inv_F = 0;
  for (int it = 0;; ++it) {
    double sum_p = 0, sum_p_over_z = 0;  // double sums: the row's rounding stays < 1 ulp
    evaluate_f32(u, p, padded(c), rf.t, eps, inv_eps, &sum_p, &sum_p_over_z);
    inv_F = static_cast<float>(1.0 / sum_p);
    if (rf.update(static_cast<float>(sum_p), static_cast<float>(-sum_p_over_z)) || it + 1 >= kMaxRootIterations)
      break;
  }
  return inv_F;
}

// Scratch space of one thread, reused across its rows.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> u;        // x - max(x), candidates first
  std::vector<acc_t> p;        // candidate values at the current threshold
  std::vector<int64_t> index;  // position of each candidate in the row
  void reserve(int64_t n) {  // + kPad: room to pad the vector loops to whole vectors
    u.resize(n + kPad);
    p.resize(n + kPad);
    index.resize(n + kPad);
  }
};

// Forward of one row of length n (elements x[k * stride]); alpha per row.
template <typename scalar_t, typename acc_t>
void forward_row(const scalar_t* x, scalar_t* y, int64_t n, int64_t stride, acc_t alpha,
                 RowScratch<acc_t>& s) {
  const acc_t eps = alpha - acc_t(1);
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) s.u[k] = static_cast<acc_t>(x[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) s.u[k] = static_cast<acc_t>(x[k * stride]);
  }
  acc_t m = neg_inf<acc_t>();
  int bad = !(eps >= acc_t(0)) || eps == -neg_inf<acc_t>();  // alpha < 1, NaN or inf
  const acc_t* u_in = s.u.data();
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t k = 0; k < n; ++k) {
    const acc_t v = u_in[k];
    bad |= (v != v) | (v == -neg_inf<acc_t>());  // NaN or +inf
    m = v > m ? v : m;
  }
  if (bad) {
    for (int64_t k = 0; k < n; ++k) y[k * stride] = static_cast<scalar_t>(quiet_nan<acc_t>());
    return;
  }
  if (m == neg_inf<acc_t>()) {  // all entries masked: zeros by definition
    for (int64_t k = 0; k < n; ++k) y[k * stride] = static_cast<scalar_t>(acc_t(0));
    return;
  }

  if (eps == acc_t(0)) {  // alpha = 1: softmax
    double sum = 0;
    if constexpr (std::is_same<acc_t, float>::value) {
      for (int64_t k = n; k < padded(n); ++k) s.u[k] = neg_inf<float>();
      sum = exp_shifted_f32(s.u.data(), s.p.data(), padded(n), m);
    } else {
      for (int64_t k = 0; k < n; ++k) {
        const acc_t e = exp_(s.u[k] - m);
        s.p[k] = e;
        sum += e;
      }
    }
    const acc_t inv = static_cast<acc_t>(1.0 / sum);
    for (int64_t k = 0; k < n; ++k) y[k * stride] = static_cast<scalar_t>(s.p[k] * inv);
    return;
  }

  // Entries more than 1/eps below the max are zero for every t >= 0 (section 8):
  // keep the others (candidates) at the front of the scratch.
  const acc_t inv_eps = acc_t(1) / eps;
  const acc_t cutoff = -inv_eps;
  int64_t c = 0;
  for (int64_t k = 0; k < n; ++k) {  // branch-free compaction (c <= k: in place is safe)
    const acc_t u = s.u[k] - m;
    s.u[c] = u;
    s.index[c] = k;
    c += u > cutoff;
  }

  for (int64_t j = c; j < padded(c); ++j) s.u[j] = neg_inf<acc_t>();
  acc_t inv_F = 0;
  if constexpr (std::is_same<acc_t, float>::value) {
    inv_F = solve_candidates_f32(s.u.data(), s.p.data(), c, eps);
  } else {
    RootFinder<acc_t> rf(threshold_upper_bound(eps, static_cast<acc_t>(c)), eps);
    for (int it = 0;; ++it) {
      acc_t sum_p = 0, sum_p_over_z = 0;
      for (int64_t j = 0; j < c; ++j) {
        const EntryAtT<acc_t> e = entry_at_t(s.u[j], rf.t, eps, inv_eps);
        s.p[j] = e.p;
        sum_p += e.p;
        sum_p_over_z += e.p_over_z;
      }
      inv_F = acc_t(1) / sum_p;
      if (rf.update(sum_p, -sum_p_over_z) || it + 1 >= kMaxRootIterations) break;
    }
  }

  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) y[k] = static_cast<scalar_t>(acc_t(0));
  } else {
    for (int64_t k = 0; k < n; ++k) y[k * stride] = static_cast<scalar_t>(acc_t(0));
  }
  for (int64_t j = 0; j < c; ++j) y[s.index[j] * stride] = static_cast<scalar_t>(s.p[j] * inv_F);
}

// Backward of one row: dX and dalpha together (sections 4 and 5).
template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> p, dy, g;
  explicit BackwardScratch(int64_t n) : p(padded(n), acc_t(0)), dy(padded(n), acc_t(0)), g(padded(n)) {}
};

// The sums of a float row entry by entry (alpha = 1 exactly, or a row holding a NaN,
// which then propagates): float terms, float partial sums over kSumChunk entries flushed
// into double, as in the vector loop. (Summed in float alone, a row of 50k entries at
// alpha = 1 lost 4e-5 of its alpha-gradient.)
BackwardSums<double> backward_sums_scalar_f32(const float* p, const float* dy, float* g, int64_t n, float eps) {
  BackwardSums<double> total;
  total.zero();
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    BackwardSums<float> part;
    part.zero();
    for (int64_t k = k0; k < k1; ++k) g[k] = accumulate_backward_entry(p[k], dy[k], eps, part);
    total = total + widen(part);
  }
  return total;
}

template <typename scalar_t, typename acc_t>
acc_t backward_row(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t n, int64_t stride,
                   acc_t alpha, BackwardScratch<acc_t>& b) {
  const acc_t eps = alpha - acc_t(1);
  for (int64_t k = 0; k < n; ++k) {
    b.p[k] = static_cast<acc_t>(y[k * stride]);
    b.dy[k] = static_cast<acc_t>(dy[k * stride]);
  }
  // The sums, q and the alpha-gradient in double for every row (float rows: float terms,
  // as the CUDA long-row kernel).
  BackwardSums<double> s;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (!(eps > 0.0f && eps < 1e30f && backward_sums_f32(b.p.data(), b.dy.data(), b.g.data(), padded(n), eps, s)))
      s = backward_sums_scalar_f32(b.p.data(), b.dy.data(), b.g.data(), n, eps);
  } else {
    s.zero();
    for (int64_t k = 0; k < n; ++k) b.g[k] = accumulate_backward_entry(b.p[k], b.dy[k], eps, s);
  }
  const acc_t q = static_cast<acc_t>(backward_q(s.g, s.g_dy));
  for (int64_t k = 0; k < n; ++k) dx[k * stride] = static_cast<scalar_t>(b.g[k] * (b.dy[k] - q));
  return static_cast<acc_t>(alpha_gradient(s, static_cast<double>(eps)));
}

// Rows per parallel_for task: about 16k elements each.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// For alpha > 2 the entries at the support edge are p = z^(1/eps) with
// 1/eps < 1: infinitely sensitive to z there, so float32 rounding of
// u - t alone costs ~sqrt(ulp). Such rows run in double.
template <typename scalar_t>
struct ForwardScratch {
  RowScratch<typename AccType<scalar_t>::type> acc;
  RowScratch<double> wide;
};

template <typename scalar_t>
void forward_row_dispatch(const scalar_t* x, scalar_t* y, int64_t n, int64_t stride,
                          typename AccType<scalar_t>::type alpha, ForwardScratch<scalar_t>& s) {
  using acc_t = typename AccType<scalar_t>::type;
  if (std::is_same<acc_t, float>::value && alpha > acc_t(2)) {
    if (static_cast<int64_t>(s.wide.u.size()) < n) s.wide.reserve(n);
    forward_row<scalar_t, double>(x, y, n, stride, static_cast<double>(alpha), s.wide);
  } else {
    forward_row<scalar_t, acc_t>(x, y, n, stride, alpha, s.acc);
  }
}

template <typename scalar_t>
void forward_cpu_typed(const Tensor& x, const Tensor& alpha, Tensor& y, const RowLayout& l) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  torch::stable::parallel_for(0, l.rows(), grain_rows(l.n), [&](int64_t begin, int64_t end) {
    ForwardScratch<scalar_t> scratch;
    scratch.acc.reserve(l.n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / l.inner, i = r % l.inner;
      const int64_t base = o * l.n * l.inner + i;
      forward_row_dispatch<scalar_t>(xp + base, yp + base, l.n, l.inner, ap[r], scratch);
    }
  });
}

template <typename scalar_t>
void backward_cpu_typed(const Tensor& dy, const Tensor& y, const Tensor& alpha, Tensor& dx,
                        Tensor& dalpha, const RowLayout& l) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  acc_t* dap = dalpha.mutable_data_ptr<acc_t>();
  torch::stable::parallel_for(0, l.rows(), grain_rows(l.n), [&](int64_t begin, int64_t end) {
    BackwardScratch<acc_t> scratch(l.n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / l.inner, i = r % l.inner;
      const int64_t base = o * l.n * l.inner + i;
      dap[r] = backward_row<scalar_t, acc_t>(dyp + base, yp + base, dxp + base, l.n, l.inner,
                                             ap[r], scratch);
    }
  });
}

Tensor entmax_forward_cpu(const Tensor& x_in, const Tensor& alpha_in, int64_t dim) {
  check_input(x_in, "x");
  ENTMAX_CHECK(x_in.is_cpu(), "entmax_forward_cpu: x must be a CPU tensor");
  dim = wrap_dim(dim, x_in.dim());
  check_rows_tensor(x_in, alpha_in, dim, "alpha");
  const Tensor x = torch::stable::contiguous(x_in);
  const Tensor alpha = torch::stable::contiguous(alpha_in);
  Tensor y = torch::stable::empty_like(x);
  const RowLayout l = row_layout(x, dim);
  if (x.numel() == 0) return y;
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    forward_cpu_typed<decltype(tag)>(x, alpha, y, l);
  });
  return y;
}

std::tuple<Tensor, Tensor> entmax_backward_cpu(const Tensor& dy_in, const Tensor& y_in,
                                               const Tensor& alpha_in, int64_t dim) {
  ENTMAX_CHECK(y_in.is_cpu() && dy_in.is_cpu(), "entmax_backward_cpu: tensors must be on the CPU");
  dim = wrap_dim(dim, y_in.dim());
  check_backward_args(dy_in, y_in, alpha_in, dim);
  const Tensor dy = torch::stable::contiguous(dy_in);
  const Tensor y = torch::stable::contiguous(y_in);
  const Tensor alpha = torch::stable::contiguous(alpha_in);
  Tensor dx = torch::stable::empty_like(y);
  Tensor dalpha = torch::stable::empty_like(alpha);
  const RowLayout l = row_layout(y, dim);
  if (y.numel() == 0) {
    torch::stable::zero_(dalpha);
    return std::make_tuple(dx, dalpha);
  }
  dispatch_float_types(y.scalar_type(), [&](auto tag) {
    backward_cpu_typed<decltype(tag)>(dy, y, alpha, dx, dalpha, l);
  });
  return std::make_tuple(dx, dalpha);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda, CPU, m) {
  m.impl("entmax_forward", TORCH_BOX(&entmax_cuda::entmax_forward_cpu));
  m.impl("entmax_backward", TORCH_BOX(&entmax_cuda::entmax_backward_cpu));
}
