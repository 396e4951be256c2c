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

template <EntryForm kForm>
inline double solve_candidates_f32_in_form(const float* u, float* p, int64_t c, float eps, float start) {
  const float inv_eps = 1.0f / eps;
  RootFinder<float> rf(threshold_upper_bound(eps, static_cast<float>(c)), eps, start);
  double F = 1;
  find_threshold(rf, [&](float t) {
    double sums[3];
    evaluate_candidates_f32<kForm>(u, p, padded(c), t, eps, inv_eps, sums);
    F = sums[0];  // double: the normalisation keeps the row's rounding below 1 ulp
    return RootSums<float>{static_cast<float>(sums[0]), static_cast<float>(-sums[1]), static_cast<float>(sums[2])};
  });
  return F;
}

// The root finding of one float row over its candidates u[0, c) (padded to whole vectors
// with -inf), 0 < eps <= 1. Leaves p at the last evaluated threshold; returns F there.
ENTMAX_CPU_CLONES
double solve_candidates_f32(const float* u, float* p, int64_t c, float eps) {
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

// Forward of one row of length n (elements x[k * stride]); alpha per row.
template <typename scalar_t, typename acc_t>
void forward_row(const scalar_t* x, scalar_t* y, int64_t n, int64_t stride, acc_t alpha, RowScratch<acc_t>& s) {
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
  if (bad) return fill_row(y, n, stride, quiet_nan<acc_t>());
  if (m == neg_inf<acc_t>()) return fill_row(y, n, stride, acc_t(0));  // all masked: zeros by definition

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
    F = solve_candidates_f32(s.u.data(), s.p.data(), c, eps);
  } else {
    F = solve_candidates_f64(s.u.data(), s.p.data(), c, eps);
  }
  const acc_t inv_F = static_cast<acc_t>(1.0 / F);
  fill_row(y, n, stride, acc_t(0));
  for (int64_t j = 0; j < c; ++j) y[s.index[j] * stride] = static_cast<scalar_t>(s.p[j] * inv_F);
}

// For alpha > 2 the entries at the support edge are p = z^(1/eps) with 1/eps < 1:
// infinitely sensitive to z there, so float32 rounding of u - t alone costs
// ~sqrt(ulp). Such float rows run in double.
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
  } else {
    forward_row<scalar_t, acc_t>(x, y, n, stride, alpha, s.acc);
  }
}

// ------------------------------------------------------------------ a batch of short rows

constexpr int kBatchLanes = 16;         // rows per batch: one AVX-512 vector of floats
constexpr int64_t kBatchMaxN = 512;     // longer rows fill vectors on their own
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

// Per-lane parameters and results of one batch (arrays over lanes).
struct BatchLanes {
  int lanes = 0;
  bool solve[kBatchLanes];    // a row to solve (the others were written directly)
  float m[kBatchLanes];       // row max
  float eps[kBatchLanes], inv_eps[kBatchLanes];
  EntryForm form[kBatchLanes];
  int64_t count[kBatchLanes];  // candidates
  int64_t base[kBatchLanes];   // offset of the row in x and y
  double F[kBatchLanes];       // sum p at the final threshold
};

// The [candidate][lane] tables of one thread's batches.
struct ForwardBatch {
  std::vector<float> row;      // the row being loaded, in float, then its u
  std::vector<float> u, p;     // [j * kBatchLanes + lane]
  std::vector<int32_t> index;  // [lane * stride + j]: the candidates' positions in their rows
  int64_t index_stride = 0;
  void reserve(int64_t n) {
    if (static_cast<int64_t>(row.size()) >= padded(n)) return;
    row.resize(padded(n));
    u.resize(padded(n) * kBatchLanes);
    p.resize(padded(n) * kBatchLanes);
    index_stride = padded(n);
    index.resize(padded(n) * kBatchLanes);
  }
};

// Row x[k * stride] as contiguous floats: x itself when it is one, else converted into buffer.
template <typename scalar_t>
const float* contiguous_float_row(const scalar_t* x, int64_t n, int64_t stride, float* buffer) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (stride == 1) return x;
  }
  for (int64_t k = 0; k < n; ++k) buffer[k] = static_cast<float>(x[k * stride]);
  return buffer;
}

// Loads lane `lane`'s row (already in float, row[0, n)): its max, whether it holds NaN or
// +inf, and its candidates: their positions (in row order) into index[0, count), their u
// into column `lane` of the table (`shifted`: room for the row's u, may be `row` itself).
struct LaneLoad {
  float m;
  bool bad;
  int64_t count;
};

ENTMAX_CPU_CLONES
LaneLoad load_lane_f32(const float* row, int64_t n, float eps, int lane, float* u, int32_t* index, float* shifted) {
  float m = neg_inf<float>();
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t k = 0; k < n; ++k) {
    const float v = row[k];
    bad |= (v != v) | (v == -neg_inf<float>());
    m = v > m ? v : m;
  }
  LaneLoad out{m, bad != 0, 0};
  if (out.bad || m == neg_inf<float>()) return out;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) shifted[k] = row[k] - m;  // u first: m - 1/eps may round to m itself
  const int64_t c = positions_above(shifted, n, -1.0f / eps, index);
  for (int64_t j = 0; j < c; ++j) u[j * kBatchLanes + lane] = shifted[index[j]];
  out.count = c;
  return out;
}

// The lanes' entries at their thresholds t[lane]: p, and F, -F', F'' per lane (float
// partial sums over chunks of kSumChunk candidates, flushed into double).
template <BatchForm kForm>
inline void evaluate_batch_f32(const float* u, float* p, int64_t rows, const BatchLanes& b, const float* t,
                               double* F, double* minus_dF, double* d2F) {
  for (int l = 0; l < kBatchLanes; ++l) F[l] = minus_dF[l] = d2F[l] = 0;
  for (int64_t j0 = 0; j0 < rows; j0 += kSumChunk) {
    const int64_t j1 = std::min(rows, j0 + kSumChunk);
    float f_p[kBatchLanes] = {}, f_p_over_z[kBatchLanes] = {}, f_curvature[kBatchLanes] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const float* uj = u + j * kBatchLanes;
      float* pj = p + j * kBatchLanes;
#pragma omp simd
      for (int l = 0; l < kBatchLanes; ++l) {
        const EntryForm form = kForm == BatchForm::kSquare   ? EntryForm::kSquare
                               : kForm == BatchForm::kLinear ? EntryForm::kLinear
                               : kForm == BatchForm::kGeneral ? EntryForm::kGeneral
                                                              : b.form[l];
        const EntryTerms<float> e = entry_terms<float, VectorMath>(uj[l], t[l], b.eps[l], b.inv_eps[l], form);
        pj[l] = e.p;
        f_p[l] += e.p;
        f_p_over_z[l] += e.p_over_z;
        f_curvature[l] += e.curvature;
      }
    }
    for (int l = 0; l < kBatchLanes; ++l) {
      F[l] += f_p[l];
      minus_dF[l] += f_p_over_z[l];
      d2F[l] += f_curvature[l];
    }
  }
}

template <BatchForm kForm>
inline void solve_batch_f32_in_form(const float* u, float* p, int64_t rows, BatchLanes& b, RootFinder<float> (&rf)[kBatchLanes]) {
  find_thresholds<float, kBatchLanes, VectorMath>(rf, [&](RootFinder<float> (&r)[kBatchLanes], RootSums<float> (&sums)[kBatchLanes]) {
    float t[kBatchLanes];
    double F[kBatchLanes], minus_dF[kBatchLanes], d2F[kBatchLanes];
    for (int l = 0; l < kBatchLanes; ++l) t[l] = r[l].t;
    evaluate_batch_f32<kForm>(u, p, rows, b, t, F, minus_dF, d2F);
    for (int l = 0; l < kBatchLanes; ++l) {
      b.F[l] = F[l];
      sums[l] = {static_cast<float>(F[l]), static_cast<float>(-minus_dF[l]), static_cast<float>(d2F[l])};
    }
  }, EachRowAlone());
}

// Pads the columns of the lanes to solve (b.solve) to the longest of them, finds their
// thresholds in lockstep, and leaves p (at each lane's final threshold) in the table and F
// in b.F. The other lanes' columns are not touched (b is this pass's copy).
ENTMAX_CPU_CLONES
void solve_batch_f32(float* u, float* p, BatchLanes& b) {
  int64_t rows = 0;
  int first = -1;
  for (int l = 0; l < kBatchLanes; ++l) {
    if (!b.solve[l]) continue;
    rows = std::max(rows, b.count[l]);
    if (first < 0) first = l;
  }
  if (first < 0) return;
  bool uniform = true;
  for (int l = 0; l < kBatchLanes; ++l) {
    if (!b.solve[l]) {  // an idle lane: harmless parameters; its column is left alone
      b.count[l] = 0;
      b.eps[l] = b.eps[first];
      b.inv_eps[l] = b.inv_eps[first];
      b.form[l] = b.form[first];
      continue;
    }
    uniform = uniform && b.form[l] == b.form[first];
    for (int64_t j = b.count[l]; j < rows; ++j) u[j * kBatchLanes + l] = neg_inf<float>();
  }
  // Each lane's bracket and Jensen's start (jensen_start's rounds, vertical over the lanes).
  float count[kBatchLanes], start[kBatchLanes], upper[kBatchLanes], sum_u[kBatchLanes] = {};
  int32_t recount[kBatchLanes] = {};
  for (int l = 0; l < kBatchLanes; ++l) count[l] = static_cast<float>(b.count[l]);
  for (int64_t j = 0; j < rows; ++j) {
#pragma omp simd
    for (int l = 0; l < kBatchLanes; ++l) {
      const float v = u[j * kBatchLanes + l];
      sum_u[l] += v > neg_inf<float>() ? v : 0.0f;
    }
  }
#pragma omp simd
  for (int l = 0; l < kBatchLanes; ++l) {
    upper[l] = threshold_upper_bound<float, VectorMath>(b.eps[l], count[l]);
    start[l] = jensen_applies(b.eps[l]) ? jensen_lower_bound<float, VectorMath>(sum_u[l], count[l], b.eps[l]) : 0.0f;
  }
  for (int round = 1; round < kJensenRounds; ++round) {
    float cut[kBatchLanes];
    for (int l = 0; l < kBatchLanes; ++l) {
      cut[l] = start[l] - b.inv_eps[l];
      sum_u[l] = 0;
      recount[l] = 0;
    }
    for (int64_t j = 0; j < rows; ++j) {
#pragma omp simd
      for (int l = 0; l < kBatchLanes; ++l) {
        const float v = u[j * kBatchLanes + l];
        const bool in = v > cut[l];
        sum_u[l] += in ? v : 0.0f;
        recount[l] += in;
      }
    }
#pragma omp simd
    for (int l = 0; l < kBatchLanes; ++l) {
      const float raised = jensen_lower_bound<float, VectorMath>(sum_u[l], static_cast<float>(recount[l]), b.eps[l]);
      start[l] = jensen_applies(b.eps[l]) ? max_(start[l], raised) : 0.0f;
    }
  }
  RootFinder<float> rf[kBatchLanes];  // default: finished (idle lanes)
  for (int l = 0; l < kBatchLanes; ++l) {
    if (b.solve[l]) rf[l] = RootFinder<float>(upper[l], b.eps[l], start[l]);
  }
  switch (batch_form(b.form[first], uniform)) {
    case BatchForm::kSquare: return solve_batch_f32_in_form<BatchForm::kSquare>(u, p, rows, b, rf);
    case BatchForm::kLinear: return solve_batch_f32_in_form<BatchForm::kLinear>(u, p, rows, b, rf);
    case BatchForm::kGeneral: return solve_batch_f32_in_form<BatchForm::kGeneral>(u, p, rows, b, rf);
    default: return solve_batch_f32_in_form<BatchForm::kMixed>(u, p, rows, b, rf);
  }
}

// Forward of rows r0 .. r0 + lanes - 1 (each of length n, elements x[base + k * stride]),
// float arithmetic. Rows the batch does not take (alpha = 1, alpha > 2, invalid alpha)
// go through forward_row_dispatch; NaN and all-masked rows are written directly.
template <typename scalar_t>
void forward_batch(const scalar_t* x, scalar_t* y, const float* alpha, int64_t r0, int lanes, int64_t n,
                   int64_t stride, ForwardBatch& fb, ForwardScratch<scalar_t>& fallback) {
  fb.reserve(n);
  BatchLanes b;
  b.lanes = lanes;
  for (int l = 0; l < kBatchLanes; ++l) b.solve[l] = false;
  for (int l = 0; l < lanes; ++l) {
    const int64_t r = r0 + l;
    const int64_t base = row_base(r, n, stride);
    const float eps = alpha[r] - 1.0f;
    if (!(eps > 0.0f && eps <= 1.0f)) {
      forward_row_dispatch<scalar_t>(x + base, y + base, n, stride, alpha[r], fallback);
      continue;
    }
    const float* row = contiguous_float_row(x + base, n, stride, fb.row.data());
    const LaneLoad load =
        load_lane_f32(row, n, eps, l, fb.u.data(), fb.index.data() + l * fb.index_stride, fb.row.data());
    if (load.bad || load.m == neg_inf<float>()) {
      fill_row(y + base, n, stride, load.bad ? quiet_nan<float>() : 0.0f);
      continue;
    }
    if (load.count > kBatchMaxCandidates) {
      forward_row_dispatch<scalar_t>(x + base, y + base, n, stride, alpha[r], fallback);
      continue;
    }
    b.solve[l] = true;
    b.m[l] = load.m;
    b.eps[l] = eps;
    b.inv_eps[l] = 1.0f / eps;
    b.form[l] = entry_form(eps);
    b.count[l] = load.count;
    b.base[l] = base;
  }
  solve_batch_f32(fb.u.data(), fb.p.data(), b);
  for (int l = 0; l < lanes; ++l) {
    if (!b.solve[l]) continue;
    scalar_t* yr = y + b.base[l];
    const float inv_F = static_cast<float>(1.0 / b.F[l]);
    fill_row(yr, n, stride, 0.0f);
    const int32_t* index = fb.index.data() + l * fb.index_stride;
    for (int64_t j = 0; j < b.count[l]; ++j) {
      yr[index[j] * stride] = static_cast<scalar_t>(fb.p[j * kBatchLanes + l] * inv_F);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace entmax_cuda
