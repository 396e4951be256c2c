// CPU forward of alpha-entmax, two ways (both run the root finder of entmax_math.h):
//  - one row at a time (any length): the row's candidates (the entries that can be
//    nonzero, section 8) compacted, each evaluation of the root finder a vector loop over
//    them;
//  - kBatchLanes short float rows at a time, one row per SIMD lane: lane l's candidates
//    in column l of a [candidate][lane] table, the Halley/Newton steps of all rows in
//    lockstep, every sum a vertical vector add. A short row is too short for a vector loop
//    of its own: per row, the fixed costs (reductions across the vector, the finder's
//    bookkeeping, the latency of a single pass) were most of the time.
#pragma once

#include "../entmax_math.h"
#include "cpu_common.h"
#include "lane_tables.h"
#include "vector_math.h"

#include <type_traits>
#include <vector>

namespace entmax_cuda {
namespace cpu {
namespace {

using namespace entmax_cuda::math;
using vmath::VectorMath;

// ------------------------------------------------------------------ one row

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

// The candidates u[0, c_padded) at threshold t (entry_terms, vectorised): p_j, and
// sums[0..2] = F, -F', F''.
template <EntryForm kForm>
inline void evaluate_candidates_f32(const float* u, float* p, int64_t c_padded, float t, float eps, float inv_eps,
                                    double (&sums)[3]) {
  double s_p = 0, s_p_over_z = 0, s_curvature = 0;
  for (int64_t j0 = 0; j0 < c_padded; j0 += kSumChunk) {
    const int64_t j1 = std::min(c_padded, j0 + kSumChunk);
    float f_p = 0, f_p_over_z = 0, f_curvature = 0;
#pragma omp simd reduction(+ : f_p, f_p_over_z, f_curvature)
    for (int64_t j = j0; j < j1; ++j) {
      const EntryTerms<float> e = entry_terms<float, VectorMath>(u[j], t, eps, inv_eps, kForm);
      p[j] = e.p;
      f_p += e.p;
      f_p_over_z += e.p_over_z;
      f_curvature += e.curvature;
    }
    s_p += f_p;
    s_p_over_z += f_p_over_z;
    s_curvature += f_curvature;
  }
  sums[0] = s_p;
  sums[1] = s_p_over_z;
  sums[2] = s_curvature;
}

// Jensen's lower bound on t* over the candidates u[0], u[stride], ... (c of them, their
// sum sum_u), raised by kJensenRounds - 1 recounts of the entries above bound - 1/eps;
// 0 where it does not apply.
template <typename T>
T jensen_start(const T* u, int64_t c, int64_t stride, T eps, double sum_u) {
  if (!jensen_applies(eps) || c == 0) return T(0);
  T t = jensen_lower_bound(static_cast<T>(sum_u), static_cast<T>(c), eps);
  for (int round = 1; round < kJensenRounds; ++round) {
    const T cut = t - T(1) / eps;
    double s = 0;
    int64_t count = 0;
#pragma omp simd reduction(+ : s, count)
    for (int64_t j = 0; j < c; ++j) {
      const T v = u[j * stride];
      const bool in = v > cut;
      s += in ? v : T(0);
      count += in;
    }
    t = max_(t, jensen_lower_bound(static_cast<T>(s), static_cast<T>(count), eps));
  }
  return t;
}

// The root finding's outcome for a row: F at the answer (double: the normalisation keeps
// the row's rounding below 1 ulp), and whether float32 resolved it (RootFinder::settled).
struct RowSolve {
  double F;
  bool settled;
};

template <EntryForm kForm>
inline RowSolve solve_candidates_f32_in_form(const float* u, float* p, int64_t c, float eps, float start) {
  const float inv_eps = 1.0f / eps;
  RootFinder<float> rf(threshold_upper_bound(eps, static_cast<float>(c)), eps, start);
  double F = 1;
  find_threshold(rf, [&](float t) {
    double sums[3];
    evaluate_candidates_f32<kForm>(u, p, padded(c), t, eps, inv_eps, sums);
    F = sums[0];
    return RootSums<float>{static_cast<float>(sums[0]), static_cast<float>(-sums[1]), static_cast<float>(sums[2])};
  });
  return {F, rf.settled()};
}

// The root finding of one float row over its candidates u[0, c) (padded to whole vectors
// with -inf), 0 < eps <= 1. Leaves p at the last evaluated threshold.
ENTMAX_CPU_CLONES
RowSolve solve_candidates_f32(const float* u, float* p, int64_t c, float eps) {
  double sum_u = 0;
#pragma omp simd reduction(+ : sum_u)
  for (int64_t j = 0; j < c; ++j) sum_u += u[j];
  const float start = jensen_start(u, c, 1, eps, sum_u);
  switch (entry_form(eps)) {
    case EntryForm::kSquare: return solve_candidates_f32_in_form<EntryForm::kSquare>(u, p, c, eps, start);
    case EntryForm::kLinear: return solve_candidates_f32_in_form<EntryForm::kLinear>(u, p, c, eps, start);
    default: return solve_candidates_f32_in_form<EntryForm::kGeneral>(u, p, c, eps, start);
  }
}

// The same for double rows (float64 inputs, and float rows with alpha > 2), entry by entry.
double solve_candidates_f64(const double* u, double* p, int64_t c, double eps) {
  double sum_u = 0;
  for (int64_t j = 0; j < c; ++j) sum_u += u[j];
  const double inv_eps = 1.0 / eps;
  const EntryForm form = entry_form(eps);
  RootFinder<double> rf(threshold_upper_bound(eps, static_cast<double>(c)), eps, jensen_start(u, c, 1, eps, sum_u));
  double F = 1;
  find_threshold(rf, [&](double t) {
    RootSums<double> s;
    s.zero();
    for (int64_t j = 0; j < c; ++j) {
      const EntryTerms<double> e = entry_terms(u[j], t, eps, inv_eps, form);
      p[j] = e.p;
      s.add(e.p, e.p_over_z, e.curvature);
    }
    F = s.F;
    return s;
  });
  return F;
}

// Scratch space of one thread, reused across its rows.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> u;        // x - max(x), candidates first
  std::vector<acc_t> p;        // candidate values at the current threshold
  std::vector<int32_t> index;  // position of each candidate in the row
  void reserve(int64_t n) {  // + kPad: room to pad the vector loops to whole vectors
    if (static_cast<int64_t>(u.size()) >= n + kPad) return;
    u.resize(n + kPad);
    p.resize(n + kPad);
    index.resize(n + kPad);
  }
};

template <typename scalar_t, typename acc_t>
void fill_row(scalar_t* y, int64_t n, int64_t stride, acc_t value) {
  for (int64_t k = 0; k < n; ++k) y[k * stride] = static_cast<scalar_t>(value);
}

// Forward of one row of length n (elements x[k * stride]); alpha per row. Returns false,
// writing nothing, for a float row that float32 does not resolve (RootFinder::settled):
// the caller solves it in double.
template <typename scalar_t, typename acc_t>
bool forward_row(const scalar_t* x, scalar_t* y, int64_t n, int64_t stride, acc_t alpha, RowScratch<acc_t>& s) {
  s.reserve(n);
  const acc_t eps = alpha - acc_t(1);
  for (int64_t k = 0; k < n; ++k) s.u[k] = static_cast<acc_t>(x[k * stride]);
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
    fill_row(y, n, stride, quiet_nan<acc_t>());
    return true;
  }
  if (m == neg_inf<acc_t>()) {  // all masked: zeros by definition
    fill_row(y, n, stride, acc_t(0));
    return true;
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
    return true;
  }

  // Entries more than 1/eps below the max are zero for every t >= 0 (section 8):
  // keep the others (candidates) at the front of the scratch (c <= k: in place is safe).
  int64_t c = 0;
  if constexpr (std::is_same<acc_t, float>::value) {
    float* u = s.u.data();
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) u[k] -= m;  // u first: m - 1/eps may round to m itself
    c = positions_above(u, n, -1.0f / eps, s.index.data());
    for (int64_t j = 0; j < c; ++j) u[j] = u[s.index[j]];
  } else {
    const acc_t cutoff = -acc_t(1) / eps;
    for (int64_t k = 0; k < n; ++k) {  // branch-free compaction
      const acc_t u = s.u[k] - m;
      s.u[c] = u;
      s.index[c] = static_cast<int32_t>(k);
      c += u > cutoff;
    }
  }
  for (int64_t j = c; j < padded(c); ++j) s.u[j] = neg_inf<acc_t>();
  double F;
  if constexpr (std::is_same<acc_t, float>::value) {
    const RowSolve solved = solve_candidates_f32(s.u.data(), s.p.data(), c, eps);
    if (!solved.settled) return false;
    F = solved.F;
  } else {
    F = solve_candidates_f64(s.u.data(), s.p.data(), c, eps);
  }
  const acc_t inv_F = static_cast<acc_t>(1.0 / F);
  fill_row(y, n, stride, acc_t(0));
  for (int64_t j = 0; j < c; ++j) y[s.index[j] * stride] = static_cast<scalar_t>(s.p[j] * inv_F);
  return true;
}

// For alpha > 2 the entries at the support edge are p = z^(1/eps) with 1/eps < 1:
// infinitely sensitive to z there, so float32 rounding of u - t alone costs
// ~sqrt(ulp). Such float rows run in double, and so do the float rows that float32
// does not resolve (forward_row returns false).
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
    forward_row<scalar_t, double>(x, y, n, stride, static_cast<double>(alpha), s.wide);
  } else if (!forward_row<scalar_t, acc_t>(x, y, n, stride, alpha, s.acc)) {
    forward_row<scalar_t, double>(x, y, n, stride, static_cast<double>(alpha), s.wide);
  }
}

// ------------------------------------------------------------------ a batch of short rows

// A lockstep pass costs its longest column for every lane, so a batch of rows with mixed
// alphas pays for its densest row: rows with more candidates than this go alone (they fill
// vectors on their own), rows of up to 128 (DSAN's 70, all dense at alpha 1.1) stay batched.
constexpr int64_t kBatchMaxCandidates = 128;

// How the rows of a batch evaluate their entries: all in one form (the usual case: rows
// of one session or head share alpha) or each lane in its own (per-lane selects).
enum class BatchForm : int { kSquare, kLinear, kGeneral, kMixed };

inline BatchForm batch_form(EntryForm first, bool uniform) {
  if (!uniform) return BatchForm::kMixed;
  return first == EntryForm::kSquare ? BatchForm::kSquare
         : first == EntryForm::kLinear ? BatchForm::kLinear
                                       : BatchForm::kGeneral;
}

// The root finders of a batch, one per lane, as arrays of RootFinder's fields, so that the
// lanes' steps (RootFinder::step, branch-free) run as one vector loop. Flags as int: the
// vectoriser did not combine conditions loaded as bytes with those of float compares.
struct FinderLanes {
  float lo[kBatchLanes], hi[kBatchLanes], t[kBatchLanes], F[kBatchLanes], extrapolation[kBatchLanes],
      step_last[kBatchLanes], step_before[kBatchLanes];
  int iterations[kBatchLanes], done[kBatchLanes], single[kBatchLanes], log_space[kBatchLanes], convex[kBatchLanes],
      expect_final[kBatchLanes], may_extrapolate[kBatchLanes];

  void set(int l, const RootFinder<float>& f) {
    lo[l] = f.lo; hi[l] = f.hi; t[l] = f.t; F[l] = f.F; extrapolation[l] = f.extrapolation;
    step_last[l] = f.step_last; step_before[l] = f.step_before;
    iterations[l] = f.iterations; done[l] = f.done ? 1 : 0; single[l] = f.single ? 1 : 0;
    log_space[l] = f.log_space ? 1 : 0; convex[l] = f.convex ? 1 : 0; expect_final[l] = f.expect_final ? 1 : 0;
    may_extrapolate[l] = f.may_extrapolate ? 1 : 0;
  }
  RootFinder<float> get(int l) const {
    RootFinder<float> f;
    f.lo = lo[l]; f.hi = hi[l]; f.t = t[l]; f.F = F[l]; f.extrapolation = extrapolation[l];
    f.step_last = step_last[l]; f.step_before = step_before[l];
    f.iterations = iterations[l]; f.done = done[l] != 0; f.single = single[l] != 0;
    f.log_space = log_space[l] != 0; f.convex = convex[l] != 0; f.expect_final = expect_final[l] != 0;
    f.may_extrapolate = may_extrapolate[l] != 0;
    return f;
  }
  // Steps every lane with its sums (finished lanes stay as they are); returns whether
  // every lane is finished.
  bool step(const RootSums<float>* sums) {
    int all_done = 1;
    // No `omp simd`: it keeps the RootFinder copies as aggregates, which do not vectorise.
    for (int l = 0; l < kBatchLanes; ++l) {
      RootFinder<float> f = get(l);
      f.step<VectorMath>(sums[l]);
      set(l, f);
      all_done &= f.done ? 1 : 0;
    }
    return all_done != 0;
  }
};

// Per-lane parameters of a batch's root finding.
struct BatchSolve {
  bool solve[kBatchLanes];    // a row to solve (the others were written directly)
  float eps[kBatchLanes], inv_eps[kBatchLanes];
  EntryForm form[kBatchLanes];
  int64_t count[kBatchLanes];  // candidates
  bool settled[kBatchLanes];   // out: float32 resolved the lane's row (RootFinder::settled)
};

// The lanes' entries u[j][l] (j < rows) at their thresholds t[l]: p, p/z and (1 - eps)
// p/z^2 into their tables, and F, -F', F'' per lane.
template <BatchForm kForm>
inline void evaluate_batch_f32(const float* u, int64_t rows, const BatchSolve& b, const float* t, float* p,
                               float* p_over_z, float* curvature, RootSums<float>* sums) {
  float f_p[kBatchLanes] = {}, f_p_over_z[kBatchLanes] = {}, f_curvature[kBatchLanes] = {};
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t at = j * kBatchLanes;
#pragma omp simd
    for (int l = 0; l < kBatchLanes; ++l) {
      const EntryForm form = kForm == BatchForm::kSquare   ? EntryForm::kSquare
                             : kForm == BatchForm::kLinear ? EntryForm::kLinear
                             : kForm == BatchForm::kGeneral ? EntryForm::kGeneral
                                                            : b.form[l];
      const EntryTerms<float> e = entry_terms<float, VectorMath>(u[at + l], t[l], b.eps[l], b.inv_eps[l], form);
      p[at + l] = e.p;
      p_over_z[at + l] = e.p_over_z;
      curvature[at + l] = e.curvature;
      f_p[l] += e.p;
      f_p_over_z[l] += e.p_over_z;
      f_curvature[l] += e.curvature;
    }
  }
  for (int l = 0; l < kBatchLanes; ++l) sums[l] = {f_p[l], -f_p_over_z[l], f_curvature[l]};
}

// The tables of a thread's batches, [j * kBatchLanes + lane].
struct ForwardBatch {
  LaneTables lanes;
  std::vector<float> rows;                      // rows that are not contiguous floats, converted
  std::vector<float> u, p, p_over_z, curvature;  // candidates, and their terms at the threshold
  void reserve(int64_t n) {
    lanes.reserve(n);
    const int64_t size = round_up_chunk(std::min(n, kBatchMaxCandidates)) * kBatchLanes;
    if (static_cast<int64_t>(u.size()) >= size && static_cast<int64_t>(rows.size()) >= n * kBatchLanes) return;
    rows.resize(n * kBatchLanes);
    u.resize(size);
    p.resize(size);
    p_over_z.resize(size);
    curvature.resize(size);
  }
};

// Each lane's start: near alpha 1 (eps <= kSoftmaxStartEps) the softmax start, from one exp
// pass; elsewhere Jensen's bound (two passes of sums). Each pass runs only where a lane of
// the batch needs it; a lane's start depends on its own column alone.
inline void batch_starts(const float* u, int64_t rows, const BatchSolve& b, float* start) {
  float count[kBatchLanes];
  int softmax[kBatchLanes];
  bool any_softmax = false, any_jensen = false;
  for (int l = 0; l < kBatchLanes; ++l) {
    count[l] = static_cast<float>(b.count[l]);
    softmax[l] = b.eps[l] <= static_cast<float>(kSoftmaxStartEps);
    any_softmax |= b.solve[l] && softmax[l];
    any_jensen |= b.solve[l] && !softmax[l] && jensen_applies(b.eps[l]);
    start[l] = 0;
  }
  if (any_jensen) {
    float sum_u[kBatchLanes] = {}, jensen[kBatchLanes];
    for (int64_t j = 0; j < rows; ++j) {
#pragma omp simd
      for (int l = 0; l < kBatchLanes; ++l) {
        const float v = u[j * kBatchLanes + l];
        sum_u[l] += v > neg_inf<float>() ? v : 0.0f;
      }
    }
#pragma omp simd
    for (int l = 0; l < kBatchLanes; ++l) jensen[l] = jensen_lower_bound<float, VectorMath>(sum_u[l], count[l], b.eps[l]);
    for (int round = 1; round < kJensenRounds; ++round) {
      float cut[kBatchLanes], recount[kBatchLanes] = {};
      for (int l = 0; l < kBatchLanes; ++l) {
        cut[l] = jensen[l] - b.inv_eps[l];
        sum_u[l] = 0;
      }
      for (int64_t j = 0; j < rows; ++j) {
#pragma omp simd
        for (int l = 0; l < kBatchLanes; ++l) {
          const float v = u[j * kBatchLanes + l];
          const float in_sum = v > cut[l] ? v : 0.0f;  // (a bool kept for both selects became a branch)
          const float in_count = v > cut[l] ? 1.0f : 0.0f;
          sum_u[l] = sum_u[l] + in_sum;
          recount[l] = recount[l] + in_count;
        }
      }
#pragma omp simd
      for (int l = 0; l < kBatchLanes; ++l) {
        jensen[l] = max_(jensen[l], jensen_lower_bound<float, VectorMath>(sum_u[l], recount[l], b.eps[l]));
      }
    }
    for (int l = 0; l < kBatchLanes; ++l) start[l] = !softmax[l] && jensen_applies(b.eps[l]) ? jensen[l] : start[l];
  }
  if (any_softmax) {
    float s0[kBatchLanes] = {}, s1[kBatchLanes] = {}, s2[kBatchLanes] = {};
    for (int64_t j = 0; j < rows; ++j) {
#pragma omp simd
      for (int l = 0; l < kBatchLanes; ++l) {
        const float v = u[j * kBatchLanes + l];
        const float w = v > neg_inf<float>() ? v : 0.0f;
        const float e = v > neg_inf<float>() ? vmath::exp2_f32(w * static_cast<float>(kLog2e)) : 0.0f;
        s0[l] += e;
        s1[l] += e * w;
        s2[l] += e * w * w;
      }
    }
    for (int l = 0; l < kBatchLanes; ++l) {
      const bool use = softmax[l] && s0[l] > 0.0f;
      start[l] = use ? softmax_start<float, VectorMath>(s0[l], s1[l], s2[l], b.eps[l]) : start[l];
    }
  }
}

// A lockstep pass: the lanes' thresholds from their candidates u (columns padded with
// -inf), then their outputs, p at the threshold / sum p, into u in place. Each lane takes
// the steps it would take alone: its result does not depend on the rows beside it.
template <BatchForm kForm>
inline void solve_batch_f32_in_form(float* u, BatchSolve& b, ForwardBatch& fb) {
  float start[kBatchLanes], upper[kBatchLanes];
  int64_t rows = 0;
  for (int l = 0; l < kBatchLanes; ++l) rows = std::max(rows, b.count[l]);
  batch_starts(u, rows, b, start);
#pragma omp simd
  for (int l = 0; l < kBatchLanes; ++l) upper[l] = threshold_upper_bound<float, VectorMath>(b.eps[l], static_cast<float>(b.count[l]));

  FinderLanes finders;
  for (int l = 0; l < kBatchLanes; ++l) {
    RootFinder<float> f;  // default: finished (idle lanes)
    if (b.solve[l]) {
      f = RootFinder<float>(upper[l], b.eps[l], start[l]);
      f.may_extrapolate = extrapolation_applies(b.eps[l]);
    }
    finders.set(l, f);
  }
  // The lanes' last evaluation: F (double for the normalisation), F', F''.
  double F[kBatchLanes];
  float dF[kBatchLanes], d2F[kBatchLanes];
  for (int l = 0; l < kBatchLanes; ++l) {
    F[l] = 1;
    dF[l] = d2F[l] = 0;
  }
  float* p = fb.p.data();
  float* p_over_z = fb.p_over_z.data();
  float* curvature = fb.curvature.data();
  int64_t active_rows = rows;
  while (true) {
    // Finished lanes keep their t: re-evaluating them gives the same terms, and entries past
    // the longest unfinished column keep those of the finished lanes' last evaluation.
    RootSums<float> sums[kBatchLanes];
    evaluate_batch_f32<kForm>(u, active_rows, b, finders.t, p, p_over_z, curvature, sums);
    for (int l = 0; l < kBatchLanes; ++l) {
      if (finders.done[l]) continue;
      F[l] = sums[l].F;
      dF[l] = sums[l].dF;
      d2F[l] = sums[l].d2F;
    }
    if (finders.step(sums)) break;
    active_rows = 0;
    for (int l = 0; l < kBatchLanes; ++l) {
      if (!finders.done[l]) active_rows = std::max(active_rows, b.count[l]);
    }
  }
  // Each lane's answer: its last evaluation, or the Taylor expansion of it by the final step.
  float dt[kBatchLanes], inv_F[kBatchLanes];
  for (int l = 0; l < kBatchLanes; ++l) {
    b.settled[l] = finders.get(l).settled();
    dt[l] = finders.extrapolation[l];
    inv_F[l] = static_cast<float>(1.0 / extrapolate_sum<double>(F[l], dF[l], d2F[l], dt[l]));
  }
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t at = j * kBatchLanes;
#pragma omp simd
    for (int l = 0; l < kBatchLanes; ++l) {
      const float q = extrapolate_entry(p[at + l], p_over_z[at + l], curvature[at + l], dt[l]);
      u[at + l] = max_(q, 0.0f) * inv_F[l];  // (q >= 0 for eps <= 1/2 in exact arithmetic)
    }
  }
}

// The batch's root finding in the lanes b.solve, in place: u (their candidates, columns
// padded with -inf) becomes the output at those positions. Idle lanes get harmless
// parameters.
ENTMAX_CPU_CLONES
void solve_batch_f32(float* u, BatchSolve& b, ForwardBatch& fb) {
  int first = -1;
  for (int l = 0; l < kBatchLanes; ++l) {
    if (b.solve[l]) {
      first = l;
      break;
    }
  }
  if (first < 0) return;
  bool uniform = true;
  for (int l = 0; l < kBatchLanes; ++l) {
    if (!b.solve[l]) {
      b.count[l] = 0;
      b.eps[l] = b.eps[first];
      b.inv_eps[l] = b.inv_eps[first];
      b.form[l] = b.form[first];
    }
    uniform = uniform && b.form[l] == b.form[first];
  }
  switch (batch_form(b.form[first], uniform)) {
    case BatchForm::kSquare: return solve_batch_f32_in_form<BatchForm::kSquare>(u, b, fb);
    case BatchForm::kLinear: return solve_batch_f32_in_form<BatchForm::kLinear>(u, b, fb);
    case BatchForm::kGeneral: return solve_batch_f32_in_form<BatchForm::kGeneral>(u, b, fb);
    default: return solve_batch_f32_in_form<BatchForm::kMixed>(u, b, fb);
  }
}

// Row x[k * stride] as contiguous floats: x itself when it is one, else converted into buffer.
template <typename scalar_t>
const float* contiguous_float_row(const scalar_t* x, int64_t n, int64_t stride, float* buffer) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (stride == 1) return x;
  }
  for (int64_t k = 0; k < n; ++k) buffer[k] = static_cast<float>(x[k * stride]);
  return buffer;
}

// Row y[k * stride] as contiguous floats to write into: y itself when it is one, else nullptr.
template <typename scalar_t>
float* contiguous_float_out(scalar_t* y, int64_t stride) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (stride == 1) return y;
  }
  return nullptr;
}

// Forward of rows r0 .. r0 + lanes - 1 (each of length n, elements x[base + k * stride]),
// float arithmetic. Rows the batch does not take (alpha = 1, alpha > 2, invalid alpha, too
// many candidates) go through forward_row_dispatch; NaN and all-masked rows are written
// directly; rows the batch does not resolve in float32 are solved again in double.
template <typename scalar_t>
void forward_batch(const scalar_t* x, scalar_t* y, const float* alpha, int64_t r0, int lanes, int64_t n,
                   int64_t stride, ForwardBatch& fb, ForwardScratch<scalar_t>& fallback) {
  fb.reserve(n);
  const float* rows[kBatchLanes] = {};
  float cut[kBatchLanes];
  int64_t base[kBatchLanes];
  BatchSolve b;
  for (int l = 0; l < kBatchLanes; ++l) {
    b.solve[l] = false;
    b.settled[l] = true;
    b.count[l] = 0;
    cut[l] = 0;
  }
  for (int l = 0; l < lanes; ++l) {
    const int64_t r = r0 + l;
    base[l] = row_base(r, n, stride);
    const float eps = alpha[r] - 1.0f;
    if (!(eps > 0.0f && eps <= 1.0f)) {
      forward_row_dispatch<scalar_t>(x + base[l], y + base[l], n, stride, alpha[r], fallback);
      continue;
    }
    rows[l] = contiguous_float_row(x + base[l], n, stride, fb.rows.data() + l * n);
    cut[l] = -1.0f / eps;
    b.eps[l] = eps;
    b.inv_eps[l] = 1.0f / eps;
    b.form[l] = entry_form(eps);
  }
  LaneLoad load[kBatchLanes];
  const int64_t height = load_candidates(rows, n, cut, kBatchMaxCandidates, fb.lanes, fb.u.data(), load);
  float* out[kBatchLanes] = {};
  for (int l = 0; l < lanes; ++l) {
    const int64_t r = r0 + l;
    if (load[l].status == LaneStatus::kFill) {
      fill_row(y + base[l], n, stride, load[l].bad ? quiet_nan<float>() : 0.0f);
    } else if (load[l].status == LaneStatus::kTooMany) {
      forward_row_dispatch<scalar_t>(x + base[l], y + base[l], n, stride, alpha[r], fallback);
    } else if (load[l].status == LaneStatus::kSolve) {
      b.solve[l] = true;
      b.count[l] = fb.lanes.count[l];
      float* direct = contiguous_float_out(y + base[l], stride);
      out[l] = direct != nullptr ? direct : fb.rows.data() + l * n;  // (the row's input is loaded)
    }
  }
  solve_batch_f32(fb.u.data(), b, fb);
  store_selected(fb.u.data(), height, out, n, fb.lanes);
  for (int l = 0; l < lanes; ++l) {
    if (out[l] == nullptr) continue;
    if (!b.settled[l]) {
      forward_row<scalar_t, double>(x + base[l], y + base[l], n, stride, static_cast<double>(alpha[r0 + l]),
                                    fallback.wide);
      continue;
    }
    if (out[l] == contiguous_float_out(y + base[l], stride)) continue;
    for (int64_t k = 0; k < n; ++k) y[base[l] + k * stride] = static_cast<scalar_t>(out[l][k]);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace entmax_cuda
