// The CPU attention kernel's per-row loops over a score tile (attention_cpu.cpp): pass 0's
// scan, the entries at a threshold with their sums, and the backward's entries and sums.
#pragma once

#include "attention_cpu_tiles.h"

namespace entmax_cuda {
namespace {

// ------------------------------------------------------------------ entry loops

// Pass 0 over one row of a score tile: max (NaN ignored), number of unmasked
// scores, and whether any score is NaN or +inf.
template <typename T>
struct RowScan {
  T max;
  int64_t count;
  bool bad;
};

template <typename T>
ATTENTION_CPU_CLONES RowScan<T> scan_row(const T* s, int64_t n) {
  const T ninf = math::neg_inf<T>();
  T m = ninf;
  int64_t c = 0;
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(+ : c) reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) {
    const T x = s[j];
    bad |= (x != x) | (x == -ninf);
    c += x > ninf;
    m = x > m ? x : m;
  }
  return RowScan<T>{m, c, bad != 0};
}

// score_entry of attention_math.h over one row of a tile, vectorised for float
// (vector_math.h's exp/log1p, closed forms at alpha = 1.5 and 2; double uses the
// header's scalar function). Writes p; adds sum p and sum p/z into *F, *minus_dF.
// True when every score of a row segment is zero at threshold t (its max fails the zero
// test): the special functions of the segment are skipped.
template <typename T>
inline bool row_segment_is_zero(const T* s, int64_t n, T m, T t, T eps) {
  return zero_at_or_above(scan_row(s, n).max - m, t, eps);
}

template <typename T>
ATTENTION_CPU_CLONES void row_entries(const T* s, T* p, int64_t n, T m, T t, T eps, T inv_eps, T* F, T* minus_dF) {
  if (row_segment_is_zero(s, n, m, t, eps)) {
    for (int64_t j = 0; j < n; ++j) p[j] = T(0);
    return;
  }
  T f = 0, dz = 0;
  if constexpr (std::is_same<T, float>::value) {
    if (eps == 0.0f) {
#pragma omp simd reduction(+ : f, dz)
      for (int64_t j = 0; j < n; ++j) {
        const float u = s[j] - m;
        const float e = u == math::neg_inf<float>() ? 0.0f : vmath::exp_f32(u - t);
        p[j] = e;
        f += e;
        dz += e;
      }
    } else if (eps == 0.5f || eps == 1.0f) {
      const bool square = eps == 0.5f;
#pragma omp simd reduction(+ : f, dz)
      for (int64_t j = 0; j < n; ++j) {
        const float a = eps * ((s[j] - m) - t);
        const bool valid = a > -1.0f;
        const float z = valid ? 1.0f + a : 0.0f;
        const float pe = square ? z * z : z;
        p[j] = pe;
        f += pe;
        dz += square ? z : (valid ? 1.0f : 0.0f);
      }
    } else {
#pragma omp simd reduction(+ : f, dz)
      for (int64_t j = 0; j < n; ++j) {
        const float a = eps * ((s[j] - m) - t);
        const bool valid = a > -1.0f;
        const float as = valid ? a : 0.0f;
        const float e = vmath::exp_f32(vmath::log1p_f32(as) * inv_eps);
        const float pe = valid ? e : 0.0f;
        p[j] = pe;
        f += pe;
        dz += pe / (1.0f + as);
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const EntryAtT<T> e = score_entry<T>(s[j] - m, t, eps, inv_eps);
      p[j] = e.p;
      f += e.p;
      dz += e.p_over_z;
    }
  }
  *F += f;
  *minus_dF += dz;
}

// Backward, one row of a float tile (eps > 0): p_hat into P, g into G, and the row
// sums of backward_row_entries. kForm: 0 any alpha, 1 alpha = 1.5 (p = z^2), 2 alpha = 2 (p = z).
template <int kForm, bool kAlphaGrad>
__attribute__((always_inline)) inline void backward_row_f32(const float* s, const float* dp, float* P, float* G,
                                                            int64_t n, const BackwardRow<float>& r,
                                                            BackwardSums<float>& part) {
  const float eps = r.eps, inv_eps = r.inv_eps, m = r.m, t = r.t, inv_norm = r.inv_norm, g_scale = r.g_scale;
  const float log_norm = kAlphaGrad ? vmath::log_f32(inv_norm) : 0.0f;
  const float inv_eps2 = inv_eps * inv_eps;
  const float series_limit = math::Tolerance<float>::series_limit;
  float s_g = 0, s_g_dy = 0, s_g_c = 0, s_g_dy_c = 0;
#pragma omp simd reduction(+ : s_g, s_g_dy, s_g_c, s_g_dy_c)
  for (int64_t j = 0; j < n; ++j) {
    const float a = eps * ((s[j] - m) - t);
    const bool on = a > -1.0f;
    const float as = on ? a : 0.0f;
    const float z = 1.0f + as;
    const float l1 = (kForm == 0 || kAlphaGrad) ? vmath::log1p_f32(as) : 0.0f;
    const float p = kForm == 1 ? z * z : (kForm == 2 ? z : vmath::exp_f32(l1 * inv_eps));
    const float p_over_z = kForm == 1 ? z : (kForm == 2 ? 1.0f : p / z);
    const float ph = on ? p * inv_norm : 0.0f;
    const float g = on ? p_over_z * g_scale : 0.0f;
    P[j] = ph;
    G[j] = g;
    s_g += g;
    s_g_dy += g * dp[j];
    if (kAlphaGrad) {  // c of backward_terms (entmax_math.h)
      const float l = on ? l1 * inv_eps + log_norm : 0.0f;  // ln p_hat
      const float x = eps * l;
      const float e = vmath::expm1_f32(x);
      const float c_series = l * l * (0.5f * math::expm1_minus_x_ratio(x) * (1.0f - x) - 1.0f);
      const float c_direct = (e * (1.0f - x) - x) * inv_eps2;
      const float c = (x > -series_limit && x < series_limit) ? c_series : c_direct;
      s_g_c += g * c;
      s_g_dy_c += dp[j] * g * c;
    }
  }
  part.g = s_g; part.g_dy = s_g_dy; part.g_c = s_g_c; part.g_dy_c = s_g_dy_c;
}

// Softmax rows (eps = 0): g = p, c = -l^2/2 (accumulate_backward_entry's limits).
template <bool kAlphaGrad>
__attribute__((always_inline)) inline void backward_row_softmax_f32(const float* s, const float* dp, float* P,
                                                                    float* G, int64_t n, const BackwardRow<float>& r,
                                                                    BackwardSums<float>& part) {
  const float m = r.m, t = r.t, inv_norm = r.inv_norm;
  const float log_norm = kAlphaGrad ? vmath::log_f32(inv_norm) : 0.0f;
  float s_g = 0, s_g_dy = 0, s_g_c = 0, s_g_dy_c = 0;
#pragma omp simd reduction(+ : s_g, s_g_dy, s_g_c, s_g_dy_c)
  for (int64_t j = 0; j < n; ++j) {
    const float u = s[j] - m;
    const bool on = u != math::neg_inf<float>();
    const float x = on ? u - t : 0.0f;
    const float ph = on ? vmath::exp_f32(x) * inv_norm : 0.0f;
    P[j] = ph;
    G[j] = ph;
    s_g += ph;
    s_g_dy += ph * dp[j];
    if (kAlphaGrad) {
      const float l = on ? x + log_norm : 0.0f;  // ln p_hat
      const float c = -0.5f * l * l;
      s_g_c += ph * c;
      s_g_dy_c += dp[j] * ph * c;
    }
  }
  part.g = s_g; part.g_dy = s_g_dy; part.g_c = s_g_c; part.g_dy_c = s_g_dy_c;
}

// Backward, one row of a tile: p_hat (into P) and g (into G) from the scores,
// and the row sums of g and g dP (alpha_grad: all of BackwardSums, with dy = dP),
// added into sums. The float loops follow accumulate_backward_entry of
// entmax_math.h on (p_hat, dP), with ln p_hat = log1p(a)/eps + ln(inv_norm)
// taken from the forward formula instead of a second log; double calls it.
template <typename T>
ATTENTION_CPU_CLONES void backward_row_entries(const T* s, const T* dp, T* P, T* G, int64_t n, const BackwardRow<T>& r,
                                               bool alpha_grad, BackwardSums<double>& sums) {
  if (row_segment_is_zero(s, n, r.m, r.t, r.eps)) {
    for (int64_t j = 0; j < n; ++j) P[j] = G[j] = T(0);
    return;
  }
  if constexpr (std::is_same<T, float>::value) {
    BackwardSums<float> part;
    part.zero();
    const int form = r.eps == 0.5f ? 1 : (r.eps == 1.0f ? 2 : 0);
    if (r.eps == 0.0f) {
      if (alpha_grad) backward_row_softmax_f32<true>(s, dp, P, G, n, r, part);
      else backward_row_softmax_f32<false>(s, dp, P, G, n, r, part);
    } else if (alpha_grad) {
      if (form == 1) backward_row_f32<1, true>(s, dp, P, G, n, r, part);
      else if (form == 2) backward_row_f32<2, true>(s, dp, P, G, n, r, part);
      else backward_row_f32<0, true>(s, dp, P, G, n, r, part);
    } else {
      if (form == 1) backward_row_f32<1, false>(s, dp, P, G, n, r, part);
      else if (form == 2) backward_row_f32<2, false>(s, dp, P, G, n, r, part);
      else backward_row_f32<0, false>(s, dp, P, G, n, r, part);
    }
    sums = sums + widen(part);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const BackwardEntry<T> e = r.entry(s[j] - r.m);
      P[j] = e.p_hat;
      if (alpha_grad) {
        G[j] = accumulate_backward_entry<T>(e.p_hat, dp[j], r.eps, sums).g;
      } else {
        G[j] = e.g;
        sums.g += e.g;
        sums.g_dy += e.g * dp[j];
      }
    }
  }
}

}  // namespace
}  // namespace entmax_cuda
