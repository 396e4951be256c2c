// Row math of adaptive alpha-entmax, shared by the CPU and the CUDA kernels.
//
// No torch here: plain functions on scalars that compile as host code (CPU)
// and as device code (CUDA). The formulas and their numerics are derived in
// docs/entmax-math.md (section numbers below refer to it).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define ENTMAX_HD __host__ __device__ __forceinline__
#else
#define ENTMAX_HD inline
#endif

namespace entmax_cuda {
namespace math {

// float / double overloads of the special functions, usable on both sides.
ENTMAX_HD float log_(float x) { return logf(x); }
ENTMAX_HD double log_(double x) { return log(x); }
ENTMAX_HD float log1p_(float x) { return log1pf(x); }
ENTMAX_HD double log1p_(double x) { return log1p(x); }
ENTMAX_HD float exp_(float x) { return expf(x); }
ENTMAX_HD double exp_(double x) { return exp(x); }
ENTMAX_HD float expm1_(float x) { return expm1f(x); }
ENTMAX_HD double expm1_(double x) { return expm1(x); }

template <typename T>
ENTMAX_HD T abs_(T x) { return x < T(0) ? -x : x; }
template <typename T>
ENTMAX_HD T max_(T a, T b) { return a > b ? a : b; }

template <typename T>
ENTMAX_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }
template <typename T>
ENTMAX_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// Stopping rules of the root finder (section 3): once a Newton step is this
// small (relative to max(1, |t|)) we are in the quadratic regime, take it and
// evaluate once more; a bisection bracket this narrow is final as it is.
template <typename T> struct Tolerance;
// A residual |F - 1| this small is final too: every p_i moves the same way
// with t, so sum_i |p_i(t) - p_i(t*)| = |F(t) - 1| bounds the error directly.
// series_limit: below this |eps * ln p| the alpha-gradient's r term uses its
// series (whose truncation error, 2 x^9 / 11!, is < 1 ulp there); above it the
// direct (expm1(x) - x)/eps^2 has lost < 1 ulp to cancellation.
template <> struct Tolerance<float> {
  static constexpr float series_limit = 1.0f;
  static constexpr float newton_switch = 3e-5f;
  static constexpr float bracket = 4.8e-7f;   // 4 float32 ulps at 1
  static constexpr float residual = 2.4e-7f;  // 2 float32 ulps at 1
};
template <> struct Tolerance<double> {
  static constexpr double series_limit = 0.1;
  static constexpr double newton_switch = 1e-8;
  static constexpr double bracket = 1e-15;
  static constexpr double residual = 1e-14;
};

constexpr int kMaxRootIterations = 50;

// Upper end of the bracket for t* (section 2): (1 - d^-eps)/eps, ln d at eps=0.
// d = number of entries that can be nonzero.
template <typename T>
ENTMAX_HD T threshold_upper_bound(T eps, T d) {
  const T log_d = log_(d);
  return eps > T(0) ? -expm1_(-eps * log_d) / eps : log_d;
}

// One entry at threshold t (section 2): p = [1 + eps (u - t)]_+^(1/eps),
// computed as exp(log1p(eps (u - t)) / eps). Also returns p / z
// (= p^(2 - alpha)), the entry's share of -f'(t).
template <typename T>
struct EntryAtT {
  T p;
  T p_over_z;
};

template <typename T>
ENTMAX_HD EntryAtT<T> entry_at_t(T u, T t, T eps, T inv_eps) {
  const T a = eps * (u - t);
  EntryAtT<T> e{T(0), T(0)};
  if (a > T(-1)) {
    e.p = exp_(log1p_(a) * inv_eps);
    e.p_over_z = e.p / (T(1) + a);
  }
  return e;
}

// Safeguarded Newton iteration on g(t) = log F(t), F(t) = sum_i p_i(t)
// (section 3). Log-space Newton is exact for softmax and needs 3-8 steps
// for alpha in (1, 3]; the bracket [lo, hi] keeps every step safe.
// Usage:
//   RootFinder<T> rf(hi, eps);
//   for (int it = 0;; ++it) {
//     evaluate F, dF (= -sum p/z) at rf.t;
//     if (rf.update(F, dF) || it + 1 >= kMaxRootIterations) break;
//   }
// and the entries evaluated last are the answer (normalised by F).
// For alpha > 2 (eps > 1) f' is unbounded at the support edges, so a small
// Newton step says nothing about the distance to the root there: only the
// residual and the bracket end the iteration.
template <typename T>
struct RootFinder {
  T lo, hi, t;
  bool last;
  bool trust_small_step;

  ENTMAX_HD RootFinder(T upper, T eps)
      : lo(T(0)), hi(upper), t(T(0)), last(false), trust_small_step(eps <= T(1)) {}

  // Returns true when the evaluation just done at t is the final one.
  ENTMAX_HD bool update(T F, T dF) {
    if (last || abs_(F - T(1)) <= Tolerance<T>::residual || !(F > T(0)) || !(dF < T(0))) return true;
    if (F > T(1)) lo = t; else hi = t;
    T next = t - F * log_(F) / dF;
    const bool newton = next > lo && next < hi;
    if (!newton) next = (lo + hi) * T(0.5);
    const T scale = max_(T(1), abs_(next));
    if ((newton && trust_small_step && abs_(next - t) <= Tolerance<T>::newton_switch * scale) ||
        (hi - lo) <= Tolerance<T>::bracket * scale) {
      last = true;
    }
    if (next == t) return true;  // no representable progress left
    t = next;
    return false;
  }
};

// ---------------------------------------------------------------- backward
//
// Per entry of the support S = {p > 0} (sections 4 and 5), with l = ln p,
// x = eps*l, e = expm1(x):
//   g = p^(1-eps) = p / (1 + e)
//   w = e / eps,  v = expm1(-x)/eps = -e / ((1 + e) eps),
//   r = (expm1(x) - x)/eps^2 (series for |x| < 1).
// The row gradient needs eight sums; BackwardSums collects them.
template <typename T>
struct BackwardSums {
  T g;        // sum g
  T g_dy;     // sum g dy
  T p_l;      // E = sum p l
  T p_v;      // sum p v
  T p_v_l;    // sum p v l
  T g_w;      // sum g w
  T g_r;      // sum g r
  T dy_g_rwl; // sum dy g (r - w l)

  ENTMAX_HD void zero() { g = g_dy = p_l = p_v = p_v_l = g_w = g_r = dy_g_rwl = T(0); }
  ENTMAX_HD BackwardSums operator+(const BackwardSums& o) const {
    BackwardSums s;
    s.g = g + o.g; s.g_dy = g_dy + o.g_dy; s.p_l = p_l + o.p_l; s.p_v = p_v + o.p_v;
    s.p_v_l = p_v_l + o.p_v_l; s.g_w = g_w + o.g_w; s.g_r = g_r + o.g_r;
    s.dy_g_rwl = dy_g_rwl + o.dy_g_rwl;
    return s;
  }
};

// The same sums in double (partial sums of float terms are flushed into these).
template <typename T>
ENTMAX_HD BackwardSums<double> widen(const BackwardSums<T>& s) {
  BackwardSums<double> w;
  w.g = s.g; w.g_dy = s.g_dy; w.p_l = s.p_l; w.p_v = s.p_v;
  w.p_v_l = s.p_v_l; w.g_w = s.g_w; w.g_r = s.g_r; w.dy_g_rwl = s.dy_g_rwl;
  return w;
}

// (exp(x) - 1 - x) / (x^2 / 2) = 1 + x/3 + x^2/12 + ... ; 9 terms: truncation 2 x^9 / 11!
// (6e-8 relative at |x| = 1, 5e-17 at 0.1).
template <typename T>
ENTMAX_HD T expm1_minus_x_ratio(T x) {
  return T(1) + x * (T(1) / 3 + x * (T(1) / 12 + x * (T(1) / 60 + x * (T(1) / 360 +
         x * (T(1) / 2520 + x * (T(1) / 20160 + x * (T(1) / 181440 + x * (T(1) / 1814400))))))));
}

// Is entry p on the support? NaN counts, so that NaN propagates into the gradient.
template <typename T>
ENTMAX_HD bool on_support(T p) { return !(p <= T(0)); }

// g = p^(2 - alpha) alone (for the x-gradient when alpha's gradient is not needed).
template <typename T>
ENTMAX_HD T support_weight(T p, T eps) {
  if (!on_support(p)) return T(0);
  return eps == T(0) ? p : p * exp_(-eps * log_(p));
}

// Adds entry (p, dy) to the sums; returns its g.
template <typename T>
ENTMAX_HD T accumulate_backward_entry(T p, T dy, T eps, BackwardSums<T>& s) {
  if (!on_support(p)) return T(0);
  const T l = log_(p);
  const T x = eps * l;
  T g, w, v, r;
  if (eps == T(0)) {
    g = p; w = l; v = -l; r = l * l * T(0.5);
  } else {
    const T e = expm1_(x);
    g = p / (T(1) + e);
    w = e / eps;
    v = -w / (T(1) + e);
    r = abs_(x) < Tolerance<T>::series_limit ? l * l * T(0.5) * expm1_minus_x_ratio(x) : (e - x) / (eps * eps);
  }
  s.g += g;
  s.g_dy += g * dy;
  s.p_l += p * l;
  s.p_v += p * v;
  s.p_v_l += p * v * l;
  s.g_w += g * w;
  s.g_r += g * r;
  s.dy_g_rwl += dy * g * (r - w * l);
  return g;
}

// q = sum g dy / sum g (0 for an empty support: all -inf rows get zero gradient).
template <typename T>
ENTMAX_HD T backward_q(T sum_g, T sum_g_dy) {
  return sum_g == T(0) ? T(0) : sum_g_dy / sum_g;
}

// dL/dalpha of one row from its sums (section 5).
template <typename T>
ENTMAX_HD T alpha_gradient(const BackwardSums<T>& s, T eps) {
  if (s.g == T(0)) return T(0);
  const T Z = T(1) + eps * s.p_v;
  const T D = (s.p_v_l - s.p_v * s.p_l) / Z;
  const T r_bar = s.g_r / s.g;
  const T w_bar = s.g_w / s.g;
  return s.dy_g_rwl - s.g_dy * (r_bar + D - s.p_l * w_bar);
}

}  // namespace math
}  // namespace entmax_cuda
