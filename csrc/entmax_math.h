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

// Internal arithmetic: float for float/half/bfloat16, double for double.
template <typename scalar_t> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

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
ENTMAX_HD float log2_(float x) { return log2f(x); }
ENTMAX_HD double log2_(double x) { return log2(x); }
ENTMAX_HD float exp2_(float x) { return exp2f(x); }
ENTMAX_HD double exp2_(double x) { return exp2(x); }
ENTMAX_HD float sqrt_(float x) { return sqrtf(x); }
ENTMAX_HD double sqrt_(double x) { return sqrt(x); }

template <typename T>
ENTMAX_HD T abs_(T x) { return x < T(0) ? -x : x; }
template <typename T>
ENTMAX_HD T max_(T a, T b) { return a > b ? a : b; }

template <typename T>
ENTMAX_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }
template <typename T>
ENTMAX_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2e = 1.44269504088896340736;

// The special functions as a policy the formulas below take: LibMath calls the
// platform's (libm on the host, CUDA's on the device); the CPU's vector loops pass
// branch-free polynomials (cpu/vector_math.h) so that the same formulas vectorise.
struct LibMath {
  template <typename T> ENTMAX_HD static T log(T x) { return log_(x); }
  // (1 + a)^inv_eps for -1 < a <= 0, given z = 1 + a (rounded), which a caller has anyway.
  template <typename T> ENTMAX_HD static T pow1p(T a, T /*z*/, T inv_eps) { return exp_(log1p_(a) * inv_eps); }
  template <typename T> ENTMAX_HD static T exp(T x) { return exp_(x); }
  template <typename T> ENTMAX_HD static T log2(T x) { return log2_(x); }
  template <typename T> ENTMAX_HD static T exp2(T x) { return exp2_(x); }
  template <typename T> ENTMAX_HD static T expm1(T x) { return expm1_(x); }
  // expm1(x) for |x| >= Tolerance<T>::series_limit, given z = exp(x) (which the vector
  // loops use: z - 1 has no cancellation that far from 0).
  template <typename T> ENTMAX_HD static T expm1(T x, T /*z*/) { return expm1_(x); }
};

// Stopping rules of the root finder (section 3). The iteration ends only on the residual
// or on the bracket, never on a step's size: every p_i moves the same way with t, so
// sum_i |p_i(t) - p_i(t*)| = |F(t) - 1|, and the normalised output p(t)/F(t) is within
// |F(t) - 1| of the answer (section 3 of docs/entmax-math.md).
//   residual:  |F - 1| this small ends the iteration (the evaluation at t is the answer);
//   bracket:   a bracket narrower than this share of |t| (1 to 2 ulps), or than
//              bracket_floor, ends it too: t is then as good as this arithmetic can place
//              it (long rows of small spread cannot reach `residual` in float32: F moves
//              by about the support size times eps ulps between neighbouring t);
//   newton_residual / halley_residual: from a residual this small, a Newton (Halley)
//              step of a row whose F is convex (alpha <= 2) is expected to land within
//              `residual` (its error is about |F - 1|^2, |F - 1|^3 after Halley). That
//              only predicts the final evaluation (the fused attention does its output
//              pass there) and allows the extrapolated last step; the residual at the
//              new point still decides.
//   settled:   a float32 row whose iteration ended on the bracket with a residual above
//              this is not resolved in float32 (t's rounding alone moves F by more): the
//              kernels solve it again in double (see RootFinder::settled);
//   series_limit: below this |eps * ln p| the alpha-gradient's r term uses its series
//              (whose truncation error, 2 x^9 / 11!, is < 1 ulp there); above it the
//              direct (expm1(x) - x)/eps^2 has lost < 1 ulp to cancellation.
template <typename T> struct Tolerance;
template <> struct Tolerance<float> {
  static constexpr float series_limit = 1.0f;
  static constexpr float newton_residual = 3e-5f;
  static constexpr float halley_residual = 1e-3f;
  static constexpr float bracket = 1.1920929e-7f;        // 2^-23
  static constexpr float bracket_floor = 9.094947e-13f;  // 2^-40
  static constexpr float residual = 2.4e-7f;             // 2 float32 ulps at 1
  static constexpr float settled = 4.8e-7f;              // 4 float32 ulps at 1
};
template <> struct Tolerance<double> {
  static constexpr double series_limit = 0.1;
  static constexpr double newton_residual = 1e-8;
  static constexpr double halley_residual = 1e-5;
  static constexpr double bracket = 2.220446049250313e-16;        // 2^-52
  static constexpr double bracket_floor = 8.271806125530277e-25;  // 2^-80
  static constexpr double residual = 1e-14;
  static constexpr double settled = 1e-12;
};

static_assert(Tolerance<float>::halley_residual > Tolerance<float>::newton_residual &&
                  Tolerance<double>::halley_residual > Tolerance<double>::newton_residual,
              "RootFinder: Halley's steps may finish from a larger residual than Newton's");

// A cap on evaluations that no row reaches in practice: the safeguard below bisects at
// least every other step when Newton's steps stall, so the bracket halves at least every
// two evaluations, and ~2 x 53 evaluations take it from [0, 1/eps) to double's resolution.
constexpr int kMaxRootIterations = 128;

// Upper end of the bracket for t* (section 2): (1 - d^-eps)/eps, ln d at eps=0.
// d = number of entries that can be nonzero.
template <typename T, typename M = LibMath>
ENTMAX_HD T threshold_upper_bound(T eps, T d) {
  const T log_d = M::log(d);
  return eps > T(0) ? -M::expm1(-eps * log_d) / eps : log_d;
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

// How p depends on z = 1 + eps (u - t) in a row: the general exp(log1p(a) / eps), or the
// closed forms of section 8 that need no special function (alpha 1.5: z^2, alpha 2: z),
// or softmax (alpha 1: exp(u - t)). One value per row, chosen once.
enum class EntryForm : int { kSoftmax, kSquare, kLinear, kGeneral };

template <typename T>
ENTMAX_HD EntryForm entry_form(T eps) {
  if (eps == T(0)) return EntryForm::kSoftmax;
  if (eps == T(0.5)) return EntryForm::kSquare;
  if (eps == T(1)) return EntryForm::kLinear;
  return EntryForm::kGeneral;
}

// The derivatives the root finder needs, summed over a row at one threshold t:
// F = sum p, dF = F' = -sum p/z, d2F = F'' = (1 - eps) sum p/z^2 (section 3).
template <typename T>
struct RootSums {
  T F, dF, d2F;
  ENTMAX_HD void zero() { F = dF = d2F = T(0); }
  ENTMAX_HD void add(T p, T p_over_z, T curvature) { F += p; dF -= p_over_z; d2F += curvature; }
  ENTMAX_HD RootSums operator+(const RootSums& o) const { return {F + o.F, dF + o.dF, d2F + o.d2F}; }
};

// One entry at threshold t in the row's form: p, p/z and (1 - eps) p/z^2.
template <typename T>
struct EntryTerms {
  T p, p_over_z, curvature;
};

// Branch-free (selects only), so that CPU loops over entries vectorise; kernels that
// can skip whole groups of entries outside the support test a > -1 themselves.
template <typename T, typename M = LibMath>
ENTMAX_HD EntryTerms<T> entry_terms(T u, T t, T eps, T inv_eps, EntryForm form) {
  if (form == EntryForm::kSoftmax) {
    const T p = M::exp(u - t);
    return {p, p, p};
  }
  const T a = eps * (u - t);
  const bool inside = a > T(-1);
  const T a_in = inside ? a : T(0);  // keeps log1p away from arguments <= -1
  const T z = T(1) + a_in;
  T p, p_over_z, curvature;
  if (form == EntryForm::kSquare) {
    p = z * z; p_over_z = z; curvature = T(0.5);
  } else if (form == EntryForm::kLinear) {
    p = z; p_over_z = T(1); curvature = T(0);
  } else {
    const T inv_z = T(1) / z;
    p = M::pow1p(a_in, z, inv_eps);
    p_over_z = p * inv_z;
    curvature = (T(1) - eps) * p_over_z * inv_z;
  }
  return {inside ? p : T(0), inside ? p_over_z : T(0), inside ? curvature : T(0)};
}

// A starting point for the root finder from two sums over the candidates (no special
// function per entry): with c candidates of mean u_bar, Jensen's inequality on the convex
// z^(1/eps) (0 < eps <= 1) gives F(t_J) >= 1 at t_J = u_bar + (1 - c^-eps)/eps, so t_J <= t*.
// Counting again only the entries above t_J - 1/eps (the others are zero at every t >= t_J)
// raises the bound; at eps = 1 (sparsemax) a few rounds reach t* exactly.
template <typename T, typename M = LibMath>
ENTMAX_HD T jensen_lower_bound(T sum_u, T count, T eps) {
  return count > T(0) ? sum_u / count + threshold_upper_bound<T, M>(eps, count) : T(0);
}
// Jensen's bound holds for 0 < eps <= 1 only (for eps > 1 z^(1/eps) is concave).
template <typename T>
ENTMAX_HD bool jensen_applies(T eps) { return eps > T(0) && eps <= T(1); }
constexpr int kJensenRounds = 2;  // the bound from all candidates, then one recount

// A start near the root for alpha near 1, from one exp pass over the candidates: S0 =
// sum e^u, S1 = sum e^u u, S2 = sum e^u u^2. As eps -> 0, t* -> logsumexp(u) (section 2);
// to first order in eps, t* = lse - (eps/2) sum q w^2 with q = e^(u - lse) the softmax and
// w = u - lse (from log p = s - eps s^2/2 + O(eps^2) in s = u - t). Better than Jensen's
// bound up to eps ~ 1/4 (kSoftmaxStartEps): there it leaves a residual of a few 1e-3 at
// most, which one Halley step takes below 1e-3. Not a bound; the finder's bracket stays.
template <typename T, typename M = LibMath>
ENTMAX_HD T softmax_start(T S0, T S1, T S2, T eps) {
  const T lse = M::log(S0);
  const T mean = S1 / S0;
  const T spread = max_(S2 / S0 - mean * mean, T(0)) + (mean - lse) * (mean - lse);  // sum q w^2
  return lse - T(0.5) * eps * spread;
}
constexpr double kSoftmaxStartEps = 0.25;

// Safeguarded Newton/Halley iteration for the root of F(t) = sum_i p_i(t) = 1 (section 3).
// F is decreasing; the bracket [lo, hi] always holds the root (F(lo) >= 1 >= F(hi)), and t
// never leaves it. A Newton or Halley step is taken only when it lands strictly inside the
// bracket and is at most half the step before the last one (the rule of Numerical
// Recipes' rtsafe); otherwise the step is a bisection of the bracket. So steps that
// alternate around a kink of F without closing in (alpha > 2, where a term's slope is
// infinite at the support edge) fall back to bisection, and the bracket at least halves
// every two evaluations. The iteration ends on the residual |F - 1| or on the bracket's
// width (Tolerance), never on a step's size alone.
// The steps iterate on g = log F for rows near softmax (eps <= 1/2; exact for softmax) and
// on g = F - 1 closer to sparsemax (F is piecewise linear at eps = 1, where log F would
// cost a step). step() takes Halley's correction -2 g g' / (2 g'^2 - g g'') while it is at
// most twice Newton's in the same direction (F'' is singular at the support edge for
// alpha > 1.5; then Newton); update() takes Newton's steps (callers without F'').
// Usage: evaluate F, F' (, F'') at rf.t; rf.step(sums) or rf.update(F, F') until it
// returns true: the evaluation at t is then the answer (normalised by F), or, with an
// extrapolation, its Taylor expansion by `extrapolation` (extrapolate_entry).
// With may_extrapolate (a caller that can, see extrapolation_applies), the Halley step
// from a residual that predicts a final evaluation ends the iteration instead: t stays at
// the evaluation and `extrapolation` holds the step.
// Branch-free, so that the CPU runs it for 16 rows at once in SIMD lanes: selects, and
// bitwise & | on the conditions (short-circuits are branches).
template <typename T>
struct RootFinder {
  T lo, hi, t;
  T F = T(0);             // sum p at t, from the last evaluation
  bool done = false;      // the evaluation at t (and F) is the answer
  bool single = false;    // softmax (eps = 0): the first evaluation is the answer
  bool log_space = true;  // iterate on log F (else on F - 1)
  bool convex = true;     // eps <= 1: F is convex, Newton converges quadratically near the root
  bool expect_final = false;  // the last step predicts that the next evaluation is final
  int iterations = 0;
  T step_last = std::numeric_limits<T>::infinity();    // |t move| of the last step
  T step_before = std::numeric_limits<T>::infinity();  // and of the one before it
  bool may_extrapolate = false;  // step() may end with an extrapolation (set by the caller)
  T extrapolation = T(0);        // the step from t to the answer (0: the evaluation at t is it)
  T origin = T(0);               // a caller that iterates on t - origin sets it: the bracket's
                                 // width is judged relative to the threshold origin + t

  ENTMAX_HD RootFinder(T upper, T eps)
      : lo(T(0)), hi(upper), t(T(0)), single(eps == T(0)), log_space(eps <= T(0.5)), convex(eps <= T(1)) {}
  // Starting at `start` (a lower bound such as jensen_lower_bound; the bracket stays [0, upper]).
  ENTMAX_HD RootFinder(T upper, T eps, T start) : RootFinder(upper, eps) {
    t = start > T(0) && start < upper ? start : T(0);
  }
  // Default: a finished row with nothing to solve (masked, NaN, or outside this lockstep pass).
  ENTMAX_HD RootFinder() : RootFinder(T(0), T(1)) { done = true; }

  // One evaluation's F, F' (and F'' for Halley) at t; returns true (and keeps t) once the
  // evaluation at t is final: on the residual, the bracket, no representable progress, the
  // iteration cap, and at once for a finder that is done already (left as it is).
  template <bool kHalley, typename M>
  ENTMAX_HD bool advance(T F_at_t, T dF, T d2F) {
    const bool was_done = done;
    F = was_done ? F : F_at_t;
    iterations = was_done ? iterations : iterations + 1;
    const T residual = abs_(F - T(1));
    const bool above = F > T(1);
    const T lo_next = above ? t : lo, hi_next = above ? hi : t;
    const bool narrow = (hi_next - lo_next) <= max_(Tolerance<T>::bracket * abs_(origin + t), Tolerance<T>::bracket_floor);
    const bool finish = was_done | single | (residual <= Tolerance<T>::residual) | narrow | !(F > T(0)) |
                        !(dF < T(0)) | (iterations >= kMaxRootIterations);
    // Below, finishing rows compute values that are discarded (log of F <= 0 included).
    const T g = log_space ? M::log(F) : F - T(1);
    const T g1 = log_space ? dF / F : dF;
    T move = g / g1;
    bool halley = false;
    if (kHalley) {
      const T g2 = log_space ? d2F / F - g1 * g1 : d2F;
      const T halley_den = T(2) * g1 * g1 - g * g2;
      halley = halley_den > g1 * g1;  // false for NaN too
      move = (halley ? T(2) * g * g1 : g) / (halley ? halley_den : g1);  // no division in a select
    }
    const T candidate = t - move;
    const bool newton = (candidate > lo_next) & (candidate < hi_next) & (abs_(move) <= T(0.5) * step_before) &
                        (candidate != t);
    const T next = newton ? candidate : (lo_next + hi_next) * T(0.5);
    const bool stuck = next == t;  // no representable progress left (the bracket is a point)
    // residual <= (halley ? halley_residual : newton_residual), the former being the larger
    // (a second select on `halley` made GCC duplicate the step's code per case, unvectorisable)
    const bool predicts = newton & convex &
                          ((residual <= Tolerance<T>::newton_residual) |
                           (halley & (residual <= Tolerance<T>::halley_residual)));
    const bool extrapolate = may_extrapolate & halley & predicts;
    const bool ends = finish | stuck | extrapolate;
    lo = finish ? lo : lo_next;
    hi = finish ? hi : hi_next;
    step_before = ends ? step_before : step_last;
    step_last = ends ? step_last : abs_(next - t);
    expect_final = !ends & predicts;
    extrapolation = (finish | stuck | !extrapolate) ? extrapolation : -move;
    t = ends ? t : next;
    done = ends;
    return ends;
  }

  template <typename M = LibMath>
  ENTMAX_HD bool step(const RootSums<T>& s) { return advance<true, M>(s.F, s.dF, s.d2F); }

  // Whether the answer of a finished iteration is resolved in this arithmetic: its residual
  // is within Tolerance::settled (or it is softmax's single evaluation, or an extrapolation,
  // whose error the Halley step's residual bounds). False when the bracket ended it with t
  // as good as T can place it but F still off: long float32 rows of small spread, where
  // neighbouring floats t move F by (support size) x eps x ulp(t). Such float rows are then
  // solved in double.
  ENTMAX_HD bool settled() const {
    return single | (extrapolation != T(0)) | (abs_(F - T(1)) <= Tolerance<T>::settled);
  }
  ENTMAX_HD bool update(T F_at_t, T dF) { return advance<false, LibMath>(F_at_t, dF, T(0)); }
};

// Extrapolation applies where the Taylor expansion of every entry to second order in the
// step is accurate: p = z^(1/eps) has a bounded third derivative in t for eps <= 1/3 and
// one that stays small over a step from residual <= halley_residual up to eps = 1/2
// (where p = z^2 is exact); for eps > 1/2 p'' is singular at the support edge.
template <typename T>
ENTMAX_HD bool extrapolation_applies(T eps) { return eps > T(0) && eps <= T(0.5); }

// An entry of the last evaluation (p, p/z, (1 - eps) p/z^2, i.e. p, -p', p'') moved by the
// step dt of the threshold: p(t + dt) = p - (p/z) dt + (1 - eps) (p/z^2) dt^2 / 2 + O(dt^3).
// dt = 0 gives p itself.
template <typename T>
ENTMAX_HD T extrapolate_entry(T p, T p_over_z, T curvature, T dt) {
  return p + dt * (T(0.5) * curvature * dt - p_over_z);
}

// The row sum after the same step, from the sums of the last evaluation.
template <typename T>
ENTMAX_HD T extrapolate_sum(T F, T dF, T d2F, T dt) {
  return F + dt * (T(0.5) * d2F * dt + dF);
}

// The root-finding loop, the one copy every kernel runs (CPU rows, a batch of rows in
// SIMD lanes, a CUDA warp group, a block, a cluster of blocks):
//   evaluate(rf, sums): sums[l] of row l at rf[l].t, for every l (finished rows too: the
//                       same t gives the same sums, so a finished row's last evaluation
//                       stays its answer);
//   all_done(done):     whether every row of a lockstep team is finished (a warp whose
//                       groups solve different rows must keep iterating together).
// Rows start finished where there is nothing to solve (a default-constructed RootFinder).
//   M: the math policy of the finder's own log (LibMath; the CPU's vector loops pass theirs).
template <typename T, int L, typename M = LibMath, typename Evaluate, typename AllDone>
ENTMAX_HD void find_thresholds(RootFinder<T> (&rf)[L], Evaluate&& evaluate, AllDone&& all_done) {
  bool done = true;
  for (int l = 0; l < L; ++l) done = done && rf[l].done;
  while (!all_done(done)) {
    RootSums<T> sums[L];
    evaluate(rf, sums);
    done = true;
    for (int l = 0; l < L; ++l) {
      if (!rf[l].done) rf[l].template step<M>(sums[l]);
      done = done && rf[l].done;
    }
  }
}

// Every row on its own (no lockstep team).
struct EachRowAlone {
  ENTMAX_HD bool operator()(bool done) const { return done; }
};

// One row: evaluate_at(t) -> RootSums<T>.
template <typename T, typename EvaluateAt, typename AllDone = EachRowAlone>
ENTMAX_HD void find_threshold(RootFinder<T>& rf, EvaluateAt&& evaluate_at, AllDone&& all_done = AllDone()) {
  RootFinder<T> one[1] = {rf};
  find_thresholds(one, [&](RootFinder<T> (&r)[1], RootSums<T> (&s)[1]) { s[0] = evaluate_at(r[0].t); }, all_done);
  rf = one[0];
}

// ---------------------------------------------------------------- backward
//
// Per entry of the support S = {p > 0} (sections 4 and 5), with l = ln p,
// x = eps*l, e = expm1(x):
//   g = p^(1-eps) = p / (1 + e)                        (the x-gradient's weight)
//   c = r - w l,  w = e / eps,  r = (e - x) / eps^2      (the alpha-gradient's weight)
// With q = sum g dy / sum g, dX_i = g_i (dy_i - q) and
//   dL/dalpha = sum_i g_i (dy_i - q) (c_i - c0)   for any constant c0,
// since sum_i g_i (dy_i - q) = 0 and sum_i dp_i/dalpha = sum_i g_i (c_i - K) = 0 (section 5:
// K = sum g c / sum g). The entmax kernels take c0 = sum g c / sum g from the first pass and
// form the sum in the dX pass: the terms are then the small deviations of c, and a row whose
// entries are equal gets exactly 0. The fused attention, which has no cheap second pass over
// a row, uses the one-pass form sum g dy c - q sum g c (alpha_gradient).
template <typename T>
struct BackwardSums {
  T g;       // sum g
  T g_dy;    // sum g dy
  T g_c;     // sum g c
  T g_dy_c;  // sum g dy c (one-pass form only)

  ENTMAX_HD void zero() { g = g_dy = g_c = g_dy_c = T(0); }
  ENTMAX_HD BackwardSums operator+(const BackwardSums& o) const {
    return {g + o.g, g_dy + o.g_dy, g_c + o.g_c, g_dy_c + o.g_dy_c};
  }
};

// The same sums in double (partial sums of float terms are flushed into these).
template <typename T>
ENTMAX_HD BackwardSums<double> widen(const BackwardSums<T>& s) {
  return {static_cast<double>(s.g), static_cast<double>(s.g_dy), static_cast<double>(s.g_c),
          static_cast<double>(s.g_dy_c)};
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

// p^eps of an entry p > 0, as 2^(eps log2 p): no cancellation, and its relative error does
// not grow with |ln p| beyond the rounding of eps log2 p.
template <typename T, typename M = LibMath>
ENTMAX_HD T pow_eps(T log2_p, T eps) {
  return M::exp2(eps * log2_p);
}

// g in the row's form (section 8: alpha 1.5 needs a square root, alpha 2 nothing);
// branch-free, for p on the support.
template <typename T, typename M = LibMath>
ENTMAX_HD T support_weight_general(T p, T eps) {
  return p / pow_eps<T, M>(M::log2(p), eps);
}

template <typename T, typename M = LibMath>
ENTMAX_HD T support_weight_in_form(T p, T eps, EntryForm form) {
  switch (form) {
    case EntryForm::kSoftmax: return p;
    case EntryForm::kSquare: return sqrt_(p);
    case EntryForm::kLinear: return T(1);
    default: return support_weight_general<T, M>(p, eps);
  }
}

// The terms of one support entry for eps > 0, with l = ln p, x = eps l (x <= 0),
// z = exp(x) = p^eps (pow_eps):
//   g = p^(1-eps) = p / z,
//   c = r - w l = (e (1 - x) - x) / eps^2 = (z (1 - x) - 1) / eps^2   (e = z - 1).
// Near x = 0 (|x| < series_limit), with R = expm1_minus_x_ratio(x) (e = x + (x^2/2) R):
//   c = l^2 (R (1 - x) / 2 - 1) < 0, free of cancellation (-l^2/2 at eps -> 0).
// Farther out the -1 dominates c: entries of a flat row differ only in z (1 - x) (> 0).
// c_key keeps what the two-pass alpha-gradient needs exactly: c where the series applies,
// z (1 - x) elsewhere (its sign tells which; centred_c).
template <typename T>
struct BackwardTerms {
  T g, c, c_key;
};

template <typename T, typename M = LibMath>
ENTMAX_HD BackwardTerms<T> backward_terms(T p, T eps, T inv_eps) {
  const T log2_p = M::log2(p);
  const T l = log2_p * T(kLn2);
  const T x = eps * l;
  const T z = pow_eps<T, M>(log2_p, eps);
  const bool series = abs_(x) < Tolerance<T>::series_limit;
  const T c_series = l * l * (T(0.5) * expm1_minus_x_ratio(x) * (T(1) - x) - T(1));
  const T far = z * (T(1) - x);
  const T c_direct = (far - T(1)) * (inv_eps * inv_eps);
  return {p / z, series ? c_series : c_direct, series ? c_series : far};
}

// alpha = 1 (eps = 0): the limits of the terms above (g = p, c = -l^2/2).
template <typename T, typename M = LibMath>
ENTMAX_HD BackwardTerms<T> backward_terms_softmax(T p) {
  const T l = M::log(p);
  return {p, T(-0.5) * l * l, T(-0.5) * l * l};
}

// The terms of entry p in its row's arithmetic; zeros off the support.
template <typename T, typename M = LibMath>
ENTMAX_HD BackwardTerms<T> backward_terms_at(T p, T eps, T inv_eps) {
  if (!on_support(p)) return {T(0), T(0), T(0)};
  return eps == T(0) ? backward_terms_softmax<T, M>(p) : backward_terms<T, M>(p, eps, inv_eps);
}

// The first-pass sums of entry (dy, terms b): sum g, sum g dy, sum g c, and (one-pass
// form) sum g dy c.
template <typename T>
ENTMAX_HD void add_backward_terms(T dy, const BackwardTerms<T>& b, BackwardSums<T>& s) {
  s.g += b.g;
  s.g_dy += b.g * dy;
  s.g_c += b.g * b.c;
  s.g_dy_c += b.g * dy * b.c;
}

// Adds entry (p, dy) to the sums; returns its terms (zeros off the support).
template <typename T>
ENTMAX_HD BackwardTerms<T> accumulate_backward_entry(T p, T dy, T eps, BackwardSums<T>& s) {
  const BackwardTerms<T> b = backward_terms_at(p, eps, eps > T(0) ? T(1) / eps : T(0));
  if (on_support(p)) add_backward_terms(dy, b, s);
  return b;
}

// q = sum g dy / sum g (0 for an empty support: all -inf rows get zero gradient).
template <typename T>
ENTMAX_HD T backward_q(T sum_g, T sum_g_dy) {
  return sum_g == T(0) ? T(0) : sum_g_dy / sum_g;
}

// The constant c0 of a row's two-pass alpha-gradient: the g-weighted mean of c, which the
// entries of the series form (c_key = c <= 0) subtract directly. Entries of the far form
// (c_key = z (1 - x) > 0) subtract K = 1 + eps^2 c0 from c_key before dividing by eps^2 and
// then r = c0 - (K - 1) / eps^2, the rounding of K, so that both forms subtract c0 itself
// (in float32 with eps ~ 1e-6, K rounds to 1 and would otherwise drop c0).
template <typename T>
struct AlphaCenter {
  T c0, K, inv_eps2, r;
};

template <typename T, typename S>
ENTMAX_HD AlphaCenter<T> alpha_gradient_center(const BackwardSums<S>& s, T eps) {
  const T mean = s.g == S(0) ? T(0) : static_cast<T>(s.g_c / s.g);
  if (!(eps > T(0))) return {mean, T(1), T(0), T(0)};
  const T inv_eps2 = T(1) / (eps * eps);
  const T K = T(1) + eps * eps * mean;
  return {mean, K, inv_eps2, mean - (K - T(1)) * inv_eps2};
}

// c - c0 of an entry, from its c_key: exact for the flat rows' z (1 - x) > 0.
template <typename T>
ENTMAX_HD T centred_c(T c_key, const AlphaCenter<T>& a) {
  return c_key > T(0) ? (c_key - a.K) * a.inv_eps2 - a.r : c_key - a.c0;
}

// The two-pass alpha-gradient's term of one entry, from its dX = g (dy - q).
template <typename T>
ENTMAX_HD T alpha_gradient_term(T dx, T c_key, const AlphaCenter<T>& a) {
  return dx * centred_c(c_key, a);
}

// dL/dalpha of one row in the one-pass form: sum g dy c - q sum g c.
template <typename T>
ENTMAX_HD T alpha_gradient(const BackwardSums<T>& s) {
  if (s.g == T(0)) return T(0);
  return s.g_dy_c - backward_q(s.g, s.g_dy) * s.g_c;
}

}  // namespace math
}  // namespace entmax_cuda
