// CPU backward of alpha-entmax (sections 4 and 5): dX, and dalpha when alpha needs a
// gradient (otherwise only sum g and sum g dy are formed), two ways as the forward:
//  - one row at a time, the row in vector loops;
//  - kBatchLanes short float rows at a time, one row per SIMD lane, over each row's
//    support only (the entries with p > 0: a few of a DSAN row at alpha >= 1.5).
#pragma once

#include "../entmax_math.h"
#include "cpu_common.h"
#include "forward_rows.h"
#include "vector_math.h"

#include <type_traits>
#include <vector>

namespace entmax_cuda {
namespace cpu {
namespace {

using namespace entmax_cuda::math;
using vmath::VectorMath;

// ------------------------------------------------------------------ one row

// The backward's first-pass sums of one float row, 0 < eps <= 1 (backward_terms,
// vectorised): writes g and c_key, fills `out`. Returns false if the row holds a NaN (the
// caller then takes the scalar path, which propagates it).
ENTMAX_CPU_CLONES
bool backward_sums_f32(const float* p, const float* dy, float* g_out, float* c_out, int64_t n, float eps,
                       BackwardSums<double>& out) {
  out.zero();
  int nan = 0;
  const float inv_eps = 1.0f / eps;
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    float s_g = 0, s_g_dy = 0, s_g_c = 0;
#pragma omp simd reduction(+ : s_g, s_g_dy, s_g_c) reduction(| : nan)
    for (int64_t k = k0; k < k1; ++k) {
      const float pk = p[k], d = dy[k];
      nan |= (pk != pk) | (d != d);
      const bool on = pk > 0.0f;
      const float mask = on ? 1.0f : 0.0f;  // a factor, not selects (see batch_sums_f32_in_form)
      const BackwardTerms<float> b = backward_terms<float, VectorMath>(on ? pk : 1.0f, eps, inv_eps);
      const float g = b.g * mask;
      g_out[k] = g;
      c_out[k] = b.c_key * mask;
      s_g += g;
      s_g_dy += g * d;
      s_g_c += g * b.c * mask;
    }
    out.g += s_g;
    out.g_dy += s_g_dy;
    out.g_c += s_g_c;
  }
  return nan == 0;
}

// g alone, and sum g, sum g dy, of one float row (x-gradient only), 0 < eps <= 1.
template <EntryForm kForm>
inline bool weight_sums_f32_in_form(const float* p, const float* dy, float* g_out, int64_t n, float eps,
                                    double& sum_g, double& sum_g_dy) {
  int nan = 0;
  sum_g = sum_g_dy = 0;
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    float s_g = 0, s_g_dy = 0;
#pragma omp simd reduction(+ : s_g, s_g_dy) reduction(| : nan)
    for (int64_t k = k0; k < k1; ++k) {
      const float pk = p[k], d = dy[k];
      nan |= (pk != pk) | (d != d);
      const bool on = pk > 0.0f;
      const float g = on ? support_weight_in_form<float, VectorMath>(on ? pk : 1.0f, eps, kForm) : 0.0f;
      g_out[k] = g;
      s_g += g;
      s_g_dy += g * d;
    }
    sum_g += s_g;
    sum_g_dy += s_g_dy;
  }
  return nan == 0;
}

ENTMAX_CPU_CLONES
bool weight_sums_f32(const float* p, const float* dy, float* g_out, int64_t n, float eps, double& sum_g,
                     double& sum_g_dy) {
  switch (entry_form(eps)) {
    case EntryForm::kSquare: return weight_sums_f32_in_form<EntryForm::kSquare>(p, dy, g_out, n, eps, sum_g, sum_g_dy);
    case EntryForm::kLinear: return weight_sums_f32_in_form<EntryForm::kLinear>(p, dy, g_out, n, eps, sum_g, sum_g_dy);
    default: return weight_sums_f32_in_form<EntryForm::kGeneral>(p, dy, g_out, n, eps, sum_g, sum_g_dy);
  }
}

// The sums of a float row entry by entry (alpha = 1 exactly, or a row holding a NaN,
// which then propagates): float terms, float partial sums over kSumChunk entries flushed
// into double, as in the vector loop; g and c_key of every entry.
BackwardSums<double> backward_sums_scalar_f32(const float* p, const float* dy, float* g, float* c, int64_t n,
                                              float eps, bool alpha_grad) {
  BackwardSums<double> total;
  total.zero();
  const EntryForm form = entry_form(eps);
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    BackwardSums<float> part;
    part.zero();
    for (int64_t k = k0; k < k1; ++k) {
      if (alpha_grad) {
        const BackwardTerms<float> b = accumulate_backward_entry(p[k], dy[k], eps, part);
        g[k] = b.g;
        c[k] = b.c_key;
      } else {
        g[k] = on_support(p[k]) ? support_weight_in_form(p[k], eps, form) : 0.0f;
        part.g += g[k];
        part.g_dy += g[k] * dy[k];
      }
    }
    total = total + widen(part);
  }
  return total;
}

// The backward's second pass over a row's entries [0, n): dX = g (dy - q) in place of dy,
// and with alpha_grad the two-pass alpha-gradient sum dX (c - c0) from c_key (entmax_math.h;
// float partial sums over kSumChunk entries flushed into double). Padding has g = 0.
ENTMAX_CPU_CLONES
double backward_output_f32(float* dy_dx, const float* g, const float* c, int64_t n, float q,
                           const AlphaCenter<float>& center, bool alpha_grad) {
  double total = 0;
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    float part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t k = k0; k < k1; ++k) {
      const float d = g[k] * (dy_dx[k] - q);
      dy_dx[k] = d;
      part += alpha_grad ? alpha_gradient_term(d, c[k], center) : 0.0f;
    }
    total += part;
  }
  return total;
}

// How many entries of a float row are on the support, and whether p or dy holds a NaN.
ENTMAX_CPU_CLONES
int64_t support_size_f32(const float* p, const float* dy, int64_t n, bool& nan) {
  int any_nan = 0;
  int64_t support = 0;
#pragma omp simd reduction(| : any_nan) reduction(+ : support)
  for (int64_t k = 0; k < n; ++k) {
    any_nan |= (p[k] != p[k]) | (dy[k] != dy[k]);
    support += p[k] > 0.0f;
  }
  nan = any_nan != 0;
  return support;
}

// A row whose support is at most this share of it works on the compacted support only
// (the other entries have g = 0 and contribute nothing; their dX is 0).
inline bool sparse_support(int64_t support, int64_t n) { return 2 * support <= n; }

template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> p, dy, g, c;    // the row (padded with zeros), g and c of every entry
  std::vector<int32_t> index;        // sparse rows: the support's positions
  std::vector<acc_t> sp, sdy;        // sparse rows: p and dy of the support (padded with zeros)
  void reserve(int64_t n) {
    if (static_cast<int64_t>(p.size()) >= padded(n)) return;
    p.assign(padded(n), acc_t(0));
    dy.assign(padded(n), acc_t(0));
    g.resize(padded(n));
    c.resize(padded(n));
    index.resize(padded(n));
    sp.resize(padded(n));
    sdy.resize(padded(n));
  }
};

// The vectorised sums of float entries p[0, n_padded), 0 < eps <= 1; false on a NaN.
inline bool backward_sums_vector_f32(const float* p, const float* dy, float* g, float* c, int64_t n_padded, float eps,
                                     bool alpha_grad, BackwardSums<double>& s) {
  s.zero();
  return alpha_grad ? backward_sums_f32(p, dy, g, c, n_padded, eps, s)
                    : weight_sums_f32(p, dy, g, n_padded, eps, s.g, s.g_dy);
}

// Backward of one row: writes dX, returns dalpha (0 without alpha_grad).
// acc_t = double: float64 rows, and float rows with alpha > 2, whose entries at the
// support edge have huge weights g = p^(2 - alpha): float terms would underflow p^eps there
// and cancel in the alpha-gradient's sums.
template <typename scalar_t, typename acc_t>
acc_t backward_row(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t n, int64_t stride, acc_t alpha,
                   bool alpha_grad, BackwardScratch<acc_t>& b) {
  b.reserve(n);
  const acc_t eps = alpha - acc_t(1);
  for (int64_t k = 0; k < n; ++k) {
    b.p[k] = static_cast<acc_t>(y[k * stride]);
    b.dy[k] = static_cast<acc_t>(dy[k * stride]);
  }
  // The sums, q and the alpha-gradient in double for every row.
  BackwardSums<double> s;
  s.zero();
  if constexpr (std::is_same<acc_t, float>::value) {
    bool vector_done = false;
    if (eps > 0.0f && eps <= 1.0f) {
      bool nan = false;
      const int64_t support = support_size_f32(b.p.data(), b.dy.data(), n, nan);
      if (!nan && sparse_support(support, n)) {
        const int64_t c = positions_above(b.p.data(), n, 0.0f, b.index.data());
        for (int64_t j = 0; j < c; ++j) {
          b.sp[j] = b.p[b.index[j]];
          b.sdy[j] = b.dy[b.index[j]];
        }
        for (int64_t j = c; j < padded(c); ++j) b.sp[j] = b.sdy[j] = 0.0f;
        backward_sums_vector_f32(b.sp.data(), b.sdy.data(), b.g.data(), b.c.data(), padded(c), eps, alpha_grad, s);
        const double dalpha =
            backward_output_f32(b.sdy.data(), b.g.data(), b.c.data(), padded(c), static_cast<float>(backward_q(s.g, s.g_dy)),
                                alpha_gradient_center(s, eps), alpha_grad);
        fill_row(dx, n, stride, 0.0f);
        for (int64_t j = 0; j < c; ++j) dx[b.index[j] * stride] = static_cast<scalar_t>(b.sdy[j]);
        return static_cast<float>(dalpha);
      }
      vector_done = !nan && backward_sums_vector_f32(b.p.data(), b.dy.data(), b.g.data(), b.c.data(), padded(n), eps,
                                                     alpha_grad, s);
    }
    if (!vector_done) s = backward_sums_scalar_f32(b.p.data(), b.dy.data(), b.g.data(), b.c.data(), n, eps, alpha_grad);
    const double dalpha = backward_output_f32(b.dy.data(), b.g.data(), b.c.data(), n,
                                              static_cast<float>(backward_q(s.g, s.g_dy)),
                                              alpha_gradient_center(s, eps), alpha_grad);
    for (int64_t k = 0; k < n; ++k) dx[k * stride] = static_cast<scalar_t>(b.dy[k]);
    return static_cast<float>(dalpha);
  } else {
    const acc_t inv_eps = eps > acc_t(0) ? acc_t(1) / eps : acc_t(0);
    const EntryForm form = entry_form(eps);
    for (int64_t k = 0; k < n; ++k) {
      if (alpha_grad) {
        const BackwardTerms<acc_t> t = backward_terms_at(b.p[k], eps, inv_eps);
        if (on_support(b.p[k])) add_backward_terms(b.dy[k], t, s);
        b.g[k] = t.g;
        b.c[k] = t.c_key;
      } else {
        b.g[k] = on_support(b.p[k]) ? support_weight_in_form(b.p[k], eps, form) : acc_t(0);
        s.g += b.g[k];
        s.g_dy += b.g[k] * b.dy[k];
      }
    }
    const acc_t q = static_cast<acc_t>(backward_q(s.g, s.g_dy));
    const AlphaCenter<acc_t> center = alpha_gradient_center(s, eps);
    acc_t dalpha = 0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t d = b.g[k] * (b.dy[k] - q);
      dx[k * stride] = static_cast<scalar_t>(d);
      if (alpha_grad && on_support(b.p[k])) dalpha += alpha_gradient_term(d, b.c[k], center);
    }
    return dalpha;
  }
}

template <typename scalar_t>
struct BackwardRowScratch {
  BackwardScratch<typename AccType<scalar_t>::type> acc;
  BackwardScratch<double> wide;
};

template <typename scalar_t>
typename AccType<scalar_t>::type backward_row_dispatch(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t n,
                                                       int64_t stride, typename AccType<scalar_t>::type alpha,
                                                       bool alpha_grad, BackwardRowScratch<scalar_t>& s) {
  using acc_t = typename AccType<scalar_t>::type;
  if (std::is_same<acc_t, float>::value && alpha > acc_t(2)) {
    return static_cast<acc_t>(
        backward_row<scalar_t, double>(dy, y, dx, n, stride, static_cast<double>(alpha), alpha_grad, s.wide));
  }
  return backward_row<scalar_t, acc_t>(dy, y, dx, n, stride, alpha, alpha_grad, s.acc);
}

// ------------------------------------------------------------------ a batch of short rows

// Each lane's support (p > 0) in column `lane` of [j][lane] tables: p, dy, then g and c,
// then dX.
struct BackwardBatch {
  LaneTables lanes;
  std::vector<float> rows_p, rows_dy;  // rows that are not contiguous floats, converted
  std::vector<float> p, dy, g, c;      // [j * kBatchLanes + lane]
  void reserve(int64_t n) {
    lanes.reserve(n);
    const int64_t size = round_up_chunk(std::min(n, kBatchMaxCandidates)) * kBatchLanes;
    if (static_cast<int64_t>(p.size()) >= size && static_cast<int64_t>(rows_p.size()) >= n * kBatchLanes) return;
    rows_p.resize(n * kBatchLanes);
    rows_dy.resize(n * kBatchLanes);
    p.resize(size);
    dy.resize(size);
    g.resize(size);
    c.resize(size);
  }
};

// The lanes' sums over their supports (column j < rows; padding has p = 0): g in the
// table, the sums (double) per lane. kForm: the lanes' entry form, for the x-gradient alone
// (BatchForm::kMixed: each lane its own, forms[lane]).
template <BatchForm kForm, bool kAlphaGrad>
inline void batch_sums_f32_in_form(const float* p, const float* dy, float* g_out, float* c_out, int64_t rows,
                                   const float* eps, const float* inv_eps, const EntryForm* forms,
                                   BackwardSums<double>* out) {
  for (int l = 0; l < kBatchLanes; ++l) out[l].zero();
  for (int64_t j0 = 0; j0 < rows; j0 += kSumChunk) {
    const int64_t j1 = std::min(rows, j0 + kSumChunk);
    float s_g[kBatchLanes] = {}, s_g_dy[kBatchLanes] = {}, s_g_c[kBatchLanes] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const float* pj = p + j * kBatchLanes;
      const float* dyj = dy + j * kBatchLanes;
      float* gj = g_out + j * kBatchLanes;
      float* cj = c_out + j * kBatchLanes;
#pragma omp simd
      for (int l = 0; l < kBatchLanes; ++l) {
        const float pk = pj[l], d = dyj[l];
        const bool on = pk > 0.0f;
        const float p_in = on ? pk : 1.0f;  // keeps log finite on the padding
        if constexpr (kAlphaGrad) {
          // masks as factors: selects here defeated GCC's if-conversion (a scalar loop)
          const float mask = on ? 1.0f : 0.0f;
          const BackwardTerms<float> b = backward_terms<float, VectorMath>(p_in, eps[l], inv_eps[l]);
          const float g = b.g * mask;
          gj[l] = g;
          cj[l] = b.c_key * mask;
          s_g[l] += g;
          s_g_dy[l] += g * d;
          s_g_c[l] += g * b.c * mask;
        } else {
          float g;
          if constexpr (kForm == BatchForm::kMixed) {  // every form, then a select (the switch did not vectorise)
            const float general = support_weight_general<float, VectorMath>(p_in, eps[l]);
            const EntryForm form = forms[l];
            g = form == EntryForm::kSquare ? sqrt_(p_in) : form == EntryForm::kLinear ? 1.0f : general;
          } else {
            g = support_weight_in_form<float, VectorMath>(p_in, eps[l], kForm == BatchForm::kSquare ? EntryForm::kSquare
                                                                        : kForm == BatchForm::kLinear
                                                                            ? EntryForm::kLinear
                                                                            : EntryForm::kGeneral);
          }
          g = on ? g : 0.0f;
          gj[l] = g;
          s_g[l] += g;
          s_g_dy[l] += g * d;
        }
      }
    }
    for (int l = 0; l < kBatchLanes; ++l) {
      const BackwardSums<float> part{s_g[l], s_g_dy[l], s_g_c[l], 0.0f};
      out[l] = out[l] + widen(part);
    }
  }
}

ENTMAX_CPU_CLONES
void batch_sums_f32(const float* p, const float* dy, float* g_out, float* c_out, int64_t rows, const float* eps,
                    const float* inv_eps, const EntryForm* forms, BatchForm form, bool alpha_grad,
                    BackwardSums<double>* out) {
  if (alpha_grad) {
    return batch_sums_f32_in_form<BatchForm::kGeneral, true>(p, dy, g_out, c_out, rows, eps, inv_eps, forms, out);
  }
  switch (form) {
    case BatchForm::kSquare:
      return batch_sums_f32_in_form<BatchForm::kSquare, false>(p, dy, g_out, c_out, rows, eps, inv_eps, forms, out);
    case BatchForm::kLinear:
      return batch_sums_f32_in_form<BatchForm::kLinear, false>(p, dy, g_out, c_out, rows, eps, inv_eps, forms, out);
    case BatchForm::kGeneral:
      return batch_sums_f32_in_form<BatchForm::kGeneral, false>(p, dy, g_out, c_out, rows, eps, inv_eps, forms, out);
    default: return batch_sums_f32_in_form<BatchForm::kMixed, false>(p, dy, g_out, c_out, rows, eps, inv_eps, forms, out);
  }
}

// The lanes' second pass (backward_output_f32 for each column): dX = g (dy - q) in place of
// dy, and with alpha_grad each lane's sum dX (c - c0) from c_key.
ENTMAX_CPU_CLONES
void batch_output_f32(float* dy_dx, const float* g, const float* c, int64_t rows, const float* q, const float* c0,
                      const float* K, const float* inv_eps2, const float* r, bool alpha_grad,
                      double* shares) {
  for (int l = 0; l < kBatchLanes; ++l) shares[l] = 0;
  for (int64_t j0 = 0; j0 < rows; j0 += kSumChunk) {
    const int64_t j1 = std::min(rows, j0 + kSumChunk);
    float part[kBatchLanes] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t at = j * kBatchLanes;
#pragma omp simd
      for (int l = 0; l < kBatchLanes; ++l) {
        const float d = g[at + l] * (dy_dx[at + l] - q[l]);
        dy_dx[at + l] = d;
        const AlphaCenter<float> center{c0[l], K[l], inv_eps2[l], r[l]};
        part[l] += alpha_grad ? alpha_gradient_term(d, c[at + l], center) : 0.0f;
      }
    }
    for (int l = 0; l < kBatchLanes; ++l) shares[l] += part[l];
  }
}

// Backward of rows r0 .. r0 + lanes - 1; rows the batch does not take (alpha = 1,
// alpha > 2, invalid alpha, NaN, a support of more than kBatchMaxCandidates entries) go
// through backward_row_dispatch. Writes dX and dalpha.
template <typename scalar_t>
void backward_batch(const scalar_t* dy, const scalar_t* y, scalar_t* dx, const float* alpha, float* dalpha, int64_t r0,
                    int lanes, int64_t n, int64_t stride, bool alpha_grad, BackwardBatch& bb,
                    BackwardRowScratch<scalar_t>& fallback) {
  bb.reserve(n);
  const float* p_rows[kBatchLanes] = {};
  const float* dy_rows[kBatchLanes] = {};
  int64_t base[kBatchLanes];
  float eps[kBatchLanes], inv_eps[kBatchLanes];
  EntryForm forms[kBatchLanes];
  for (int l = 0; l < kBatchLanes; ++l) {  // idle lanes: harmless parameters
    eps[l] = inv_eps[l] = 1.0f;
    forms[l] = EntryForm::kLinear;
  }
  for (int l = 0; l < lanes; ++l) {
    const int64_t r = r0 + l;
    base[l] = row_base(r, n, stride);
    const float e = alpha[r] - 1.0f;
    if (!(e > 0.0f && e <= 1.0f)) {
      dalpha[r] = backward_row_dispatch<scalar_t>(dy + base[l], y + base[l], dx + base[l], n, stride, alpha[r],
                                                  alpha_grad, fallback);
      continue;
    }
    p_rows[l] = contiguous_float_row(y + base[l], n, stride, bb.rows_p.data() + l * n);
    dy_rows[l] = contiguous_float_row(dy + base[l], n, stride, bb.rows_dy.data() + l * n);
    eps[l] = e;
    inv_eps[l] = 1.0f / e;
    forms[l] = entry_form(e);
  }
  const int64_t height = load_supports(p_rows, dy_rows, n, kBatchMaxCandidates, bb.lanes, bb.p.data(), bb.dy.data());
  bool solve[kBatchLanes] = {};
  int first = -1;
  bool uniform = true;
  int64_t rows = 0;
  for (int l = 0; l < lanes; ++l) {
    if (p_rows[l] == nullptr) continue;
    if (bb.lanes.count[l] < 0) {  // NaN (the per-row path propagates it), or a long support
      dalpha[r0 + l] = backward_row_dispatch<scalar_t>(dy + base[l], y + base[l], dx + base[l], n, stride,
                                                       alpha[r0 + l], alpha_grad, fallback);
      continue;
    }
    solve[l] = true;
    rows = std::max(rows, bb.lanes.count[l]);
    if (first < 0) first = l;
    uniform = uniform && forms[l] == forms[first];
  }
  if (first < 0) return;
  BackwardSums<double> sums[kBatchLanes];
  batch_sums_f32(bb.p.data(), bb.dy.data(), bb.g.data(), bb.c.data(), rows, eps, inv_eps, forms,
                 batch_form(forms[first], uniform), alpha_grad, sums);
  // dX = g (dy - q) of the support entries, in place of dy, then into the rows.
  float q[kBatchLanes], c0[kBatchLanes], K[kBatchLanes], inv_eps2[kBatchLanes], r[kBatchLanes];
  for (int l = 0; l < kBatchLanes; ++l) {
    q[l] = static_cast<float>(backward_q(sums[l].g, sums[l].g_dy));
    const AlphaCenter<float> center = alpha_gradient_center(sums[l], eps[l]);
    c0[l] = center.c0;
    K[l] = center.K;
    inv_eps2[l] = center.inv_eps2;
    r[l] = center.r;
  }
  double shares[kBatchLanes];
  batch_output_f32(bb.dy.data(), bb.g.data(), bb.c.data(), rows, q, c0, K, inv_eps2, r, alpha_grad, shares);
  float* out[kBatchLanes] = {};
  for (int l = 0; l < lanes; ++l) {
    if (!solve[l]) continue;
    float* direct = contiguous_float_out(dx + base[l], stride);
    out[l] = direct != nullptr ? direct : bb.rows_p.data() + l * n;  // (the row's input is loaded)
    dalpha[r0 + l] = alpha_grad ? static_cast<float>(shares[l]) : 0.0f;
  }
  float* d = bb.dy.data();
  store_selected(d, height, out, n, bb.lanes);
  for (int l = 0; l < lanes; ++l) {
    if (out[l] == nullptr || out[l] == contiguous_float_out(dx + base[l], stride)) continue;
    for (int64_t k = 0; k < n; ++k) dx[base[l] + k * stride] = static_cast<scalar_t>(out[l][k]);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace entmax_cuda
