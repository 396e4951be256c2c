// CPU kernels of the fused alpha-entmax attention (docs/attention.md).
//
// Forward: parallel over (batch, head, query tile); per query tile, pass 0
// (row max, count, candidates, block maxima), threshold passes until every
// row's root finder is on its last evaluation, then the output pass (p.V over
// the key tiles that are not provably zero; repeated for rows whose last evaluation
// the finder does not accept), all with scores recomputed from
// q and k tile by tile. Backward: a query-tile sweep (row sums -> q_i and the
// alpha-gradient, then dQ) and a key-tile sweep (dK, dV); each output element
// is owned by one task, so results do not depend on the thread count.
// Per-thread buffers hold a few tiles; nothing of size Lq x Lk is formed.
#include "../attention_math.h"
#include "../attention_ops.h"
#include "../entmax_ops.h"
#include "vector_math.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace entmax_cuda {
namespace {

using namespace entmax_cuda::attention;
using math::BackwardSums;
using math::accumulate_backward_entry;
using math::alpha_gradient;
using math::backward_q;
using math::widen;

// The hot loops, compiled for AVX-512, AVX2 and baseline x86-64; the CPU picks
// at load time (GCC function multi-versioning), as in entmax_cpu.cpp.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ATTENTION_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define ATTENTION_CPU_CLONES
#endif

// ------------------------------------------------------------------ buffers

// 64-byte aligned scratch of one thread (a few tiles), zero-initialised.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) : n_(n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    ENTMAX_CHECK(data_ != nullptr, "entmax attention: out of memory for a ", bytes, "-byte tile buffer");
    std::memset(static_cast<void*>(data_), 0, bytes);
  }
  ~Buffer() { std::free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return data_; }
  T& operator[](int64_t i) { return data_[i]; }
  void zero() { std::memset(static_cast<void*>(data_), 0, static_cast<size_t>(n_) * sizeof(T)); }

 private:
  T* data_;
  int64_t n_;
};

// Rows of the vector loops are padded to whole 64-byte vectors with zeros.
template <typename T>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));
template <typename T>
int64_t padded_dim(int64_t d) { return (d + kLanes<T> - 1) / kLanes<T> * kLanes<T>; }

// Score columns of key tile kt that hold keys, padded to whole vectors: the columns
// past them are padding (-inf scores, p = 0), so no loop visits them, and the
// converted key tiles hold only these keys.
template <typename T>
int64_t key_tile_cols(int64_t Lk, int64_t kt) { return padded_dim<T>(std::min(kBlockK, Lk - kt * kBlockK)); }

// ------------------------------------------------------------------ matmul

template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64), aligned(alignof(T))));
};

// C[r][0, N) += sum_k A(r, k) B[k][0, N) for MB rows from m0; A(r, k) = A[r*am + k*ak],
// N a multiple of kLanes<T>. Each C element accumulates over k in order, whatever
// the row blocking, so a score is the same number in every pass.
template <typename T, int MB>
__attribute__((always_inline)) inline void gemm_rows(T* C, int64_t ldc, const T* A, int64_t am, int64_t ak,
                                                     const T* B, int64_t ldb, int64_t m0, int64_t N, int64_t K) {
  typedef typename Vec64<T>::type V;
  constexpr int64_t W = kLanes<T>;
  for (int64_t n0 = 0; n0 < N; n0 += 2 * W) {
    const bool two = n0 + W < N;
    V acc[MB][2];
    for (int r = 0; r < MB; ++r) {
      acc[r][0] = *reinterpret_cast<const V*>(C + (m0 + r) * ldc + n0);
      acc[r][1] = two ? *reinterpret_cast<const V*>(C + (m0 + r) * ldc + n0 + W) : V{};
    }
    for (int64_t k = 0; k < K; ++k) {
      const V b0 = *reinterpret_cast<const V*>(B + k * ldb + n0);
      const V b1 = two ? *reinterpret_cast<const V*>(B + k * ldb + n0 + W) : V{};
      for (int r = 0; r < MB; ++r) {
        const T a = A[(m0 + r) * am + k * ak];
        acc[r][0] += a * b0;
        acc[r][1] += a * b1;
      }
    }
    for (int r = 0; r < MB; ++r) {
      *reinterpret_cast<V*>(C + (m0 + r) * ldc + n0) = acc[r][0];
      if (two) *reinterpret_cast<V*>(C + (m0 + r) * ldc + n0 + W) = acc[r][1];
    }
  }
}

template <typename T>
ATTENTION_CPU_CLONES void gemm_acc(T* C, int64_t ldc, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb,
                                   int64_t M, int64_t N, int64_t K) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) gemm_rows<T, 4>(C, ldc, A, am, ak, B, ldb, m0, N, K);
  for (; m0 < M; ++m0) gemm_rows<T, 1>(C, ldc, A, am, ak, B, ldb, m0, N, K);
}

// C = A B (C zeroed first).
template <typename T>
void gemm(T* C, int64_t ldc, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb, int64_t M, int64_t N,
          int64_t K) {
  for (int64_t r = 0; r < M; ++r) std::memset(static_cast<void*>(C + r * ldc), 0, sizeof(T) * N);
  gemm_acc(C, ldc, A, am, ak, B, ldb, M, N, K);
}

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

// ------------------------------------------------------------------ views

// A 4-d strided tensor (b, h, i, j) read element by element.
template <typename T>
struct View4 {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  View4() = default;
  explicit View4(const Tensor& t)
      : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* row(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

enum MaskKind { kNoMask = 0, kBoolMask = 1, kAdditiveMask = 2 };

// Everything a tile needs to know about one attention call.
template <typename scalar_t, typename acc_t>
struct Problem {
  int64_t B, Hq, Hkv, group, Lq, Lk, D, Dv, nQ, nK, causal, offset;
  int64_t Dp, Dvp;  // head dims padded to whole vectors
  acc_t scale;
  View4<scalar_t> q, k, v;
  const acc_t* alpha;
  int64_t as0, as1, as2;
  int mask_kind;
  View4<bool> bool_mask;
  View4<acc_t> add_mask;

  acc_t alpha_at(int64_t b, int64_t h, int64_t i) const { return alpha[b * as0 + h * as1 + i * as2]; }
  int64_t key_cols(int64_t kt) const { return key_tile_cols<acc_t>(Lk, kt); }
  int64_t map_index(int64_t b, int64_t h, int64_t qt, int64_t kt) const { return ((b * Hq + h) * nQ + qt) * nK + kt; }
  int64_t stat_index(int64_t b, int64_t h, int64_t stat, int64_t i) const {
    return ((b * Hq + h) * kNumStats + stat) * Lq + i;
  }
};

// dst[r][c] = src(r, c) * mul for r < rows, c < cols; 0 up to (rows_pad, ld).
template <typename scalar_t, typename acc_t>
void load_rows(acc_t* dst, int64_t ld, int64_t rows_pad, const scalar_t* src, int64_t rs, int64_t cs, int64_t rows,
               int64_t cols, acc_t mul) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    acc_t* d = dst + r * ld;
    if (r < rows) {
      const scalar_t* s = src + r * rs;
      if (cs == 1) {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]) * mul;
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c * cs]) * mul;
      }
      for (int64_t c = cols; c < ld; ++c) d[c] = acc_t(0);
    } else {
      for (int64_t c = 0; c < ld; ++c) d[c] = acc_t(0);
    }
  }
}

// dst[c][r] = src(r, c) for r < rows, c < cols (a key tile transposed: [dim][key],
// ld keys a row), keys r in [rows, ld) zero.
template <typename scalar_t, typename acc_t>
void load_transposed(acc_t* dst, int64_t ld, const scalar_t* src, int64_t rs, int64_t cs, int64_t rows,
                     int64_t cols) {
  for (int64_t r = 0; r < ld; ++r) {
    if (r < rows) {
      const scalar_t* s = src + r * rs;
      for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = static_cast<acc_t>(s[c * cs]);
    } else {
      for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = acc_t(0);
    }
  }
}

// Masks the first n columns of a score tile S[r][j] (rows given by their query index
// rows[r]): keys past the causal limit or past Lk -> -inf, bool mask False -> -inf,
// additive mask added.
template <typename scalar_t, typename acc_t>
void mask_scores(acc_t* S, const int64_t* rows, int64_t n_rows, int64_t n, int64_t b, int64_t h, int64_t j0,
                 const Problem<scalar_t, acc_t>& P) {
  const acc_t ninf = math::neg_inf<acc_t>();
  for (int64_t r = 0; r < n_rows; ++r) {
    acc_t* s = S + r * kBlockK;
    const int64_t i = rows[r];
    const int64_t limit = std::min<int64_t>(n, visible_keys(i, P.causal, P.offset, P.Lk) - j0);
    for (int64_t j = std::max<int64_t>(limit, 0); j < n; ++j) s[j] = ninf;
    if (P.mask_kind == kBoolMask) {
      const bool* m = P.bool_mask.row(b, h, i) + j0 * P.bool_mask.s3;
      const int64_t st = P.bool_mask.s3;
      for (int64_t j = 0; j < limit; ++j)
        if (!m[j * st]) s[j] = ninf;
    } else if (P.mask_kind == kAdditiveMask) {
      const acc_t* m = P.add_mask.row(b, h, i) + j0 * P.add_mask.s3;
      const int64_t st = P.add_mask.s3;
      for (int64_t j = 0; j < limit; ++j) s[j] += m[j * st];
    }
  }
}

// Work items in an order that spreads causal work evenly over torch's contiguous
// chunks: query (or key) tiles alternate from both ends.
inline int64_t zigzag(int64_t x, int64_t n) { return (x % 2 == 0) ? x / 2 : n - 1 - x / 2; }

// Key and value tiles converted to acc_t once per call, in the layouts the tile
// matmuls read: keys as columns [D][Bk], keys as rows [Bk][Dp], values as columns
// [Dv][Bk], values as rows [Bk][Dvp], Bk = key_tile_cols (the last tile of a head
// can be narrower); keys past Lk are zero. A converted copy of k and v (linear in
// Lk): every pass over the key tiles reads them without converting or transposing again.
enum TileLayout { kKeysT = 0, kKeys = 1, kValuesT = 2, kValues = 3, kNumLayouts = 4 };

template <typename acc_t>
struct KeyTiles {
  Tensor storage;
  const acc_t* base = nullptr;
  int64_t Hkv = 0, Lk = 0, keys = 0;  // keys: the padded keys of one head, sum of its tiles' widths
  int64_t per_key = 0;                // elements a key takes over the layouts held
  int64_t offset[kNumLayouts] = {0, 0, 0, 0};  // per key: the layouts held before this one
  // Tile kt of head (b, hk) starts at its first key, kt * kBlockK (every tile before
  // it is kBlockK wide), and holds its layouts one after the other.
  acc_t* tile(TileLayout layout, int64_t b, int64_t hk, int64_t kt) const {
    return const_cast<acc_t*>(base) + ((b * Hkv + hk) * keys + kt * kBlockK) * per_key +
           key_tile_cols<acc_t>(Lk, kt) * offset[layout];
  }
  const acc_t* get(TileLayout layout, int64_t b, int64_t hk, int64_t kt) const { return tile(layout, b, hk, kt); }
};

template <typename scalar_t, typename acc_t>
KeyTiles<acc_t> prepare_key_tiles(const Problem<scalar_t, acc_t>& P, const Tensor& acc_like,
                                  std::initializer_list<TileLayout> layouts) {
  KeyTiles<acc_t> tiles;
  tiles.Hkv = P.Hkv;
  tiles.Lk = P.Lk;
  tiles.keys = P.nK == 0 ? 0 : (P.nK - 1) * kBlockK + P.key_cols(P.nK - 1);
  const int64_t width[kNumLayouts] = {P.D, P.Dp, P.Dv, P.Dvp};
  bool want[kNumLayouts] = {false, false, false, false};
  for (TileLayout l : layouts) want[l] = true;
  for (int l = 0; l < kNumLayouts; ++l) {
    tiles.offset[l] = tiles.per_key;
    if (want[l]) tiles.per_key += width[l];
  }
  const int64_t n_tiles = P.B * P.Hkv * P.nK;
  tiles.storage =
      torch::stable::new_empty(acc_like, {std::max<int64_t>(P.B * P.Hkv * tiles.keys * tiles.per_key, 1)});
  tiles.base = tiles.storage.template mutable_data_ptr<acc_t>();
  torch::stable::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t kt = tile % P.nK, bh = tile / P.nK, b = bh / P.Hkv, hk = bh % P.Hkv;
      const int64_t j0 = kt * kBlockK, keys = std::min<int64_t>(kBlockK, P.Lk - j0), cols = P.key_cols(kt);
      const scalar_t* k = P.k.row(b, hk, j0);
      const scalar_t* v = P.v.row(b, hk, j0);
      if (want[kKeysT]) load_transposed(tiles.tile(kKeysT, b, hk, kt), cols, k, P.k.s2, P.k.s3, keys, P.D);
      if (want[kKeys])
        load_rows(tiles.tile(kKeys, b, hk, kt), P.Dp, cols, k, P.k.s2, P.k.s3, keys, P.D, acc_t(1));
      if (want[kValuesT]) load_transposed(tiles.tile(kValuesT, b, hk, kt), cols, v, P.v.s2, P.v.s3, keys, P.Dv);
      if (want[kValues])
        load_rows(tiles.tile(kValues, b, hk, kt), P.Dvp, cols, v, P.v.s2, P.v.s3, keys, P.Dv, acc_t(1));
    }
  });
  return tiles;
}

// ------------------------------------------------------------------ forward

// A query tile that sees at most this many key tiles (short sequences, such as
// DSAN's sessions) keeps its score tiles: the forward's threshold and output passes
// read pass 0's, the backward's dQ loop those (and dP) of its first loop, instead of
// recomputing them. A score is the same number in every pass (gemm_rows), so only
// the cost changes. 64 KB (float; 128 KB double) per thread and kept tile kind.
constexpr int64_t kKeptScoreTiles = 4;

template <typename scalar_t, typename acc_t>
struct ForwardScratch {
  Buffer<acc_t> Q, Qc, S, Pt, O;
  Buffer<acc_t> kept;  // kKeptScoreTiles score tiles [kt][row][key]
  std::vector<acc_t> block_max;
  std::vector<RowCandidates<acc_t, kCandidates>> cand;
  std::vector<RowThreshold<acc_t>> th;
  std::vector<acc_t> row_max;
  std::vector<int64_t> count, rows, pending;
  std::vector<char> bad;
  std::vector<double> F, minus_dF;
  explicit ForwardScratch(const Problem<scalar_t, acc_t>& P)
      : Q(kBlockQ * P.Dp), Qc(kBlockQ * P.Dp), S(kBlockQ * kBlockK),
        Pt(kBlockQ * kBlockK), O(kBlockQ * P.Dvp), kept(kKeptScoreTiles * kBlockQ * kBlockK), block_max(P.nK),
        cand(kBlockQ), th(kBlockQ), row_max(kBlockQ),
        count(kBlockQ), rows(kBlockQ), pending(kBlockQ), bad(kBlockQ), F(kBlockQ), minus_dF(kBlockQ) {}
};

template <typename scalar_t, typename acc_t>
void forward_query_tile(ForwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                        const KeyTiles<acc_t>& tiles, int64_t b, int64_t h, int64_t qt, scalar_t* out, acc_t* stats,
                        uint8_t* block_map) {
  const acc_t ninf = math::neg_inf<acc_t>();
  const int64_t hk = h / P.group, i0 = qt * kBlockQ, n_rows = std::min<int64_t>(kBlockQ, P.Lq - i0);
  const int64_t n_kt = key_tiles_for_query_tile(qt, P.Lq, P.Lk, P.causal);
  const bool keep = n_kt <= kKeptScoreTiles;
  // Score tile kt of pass 0: kept (rows r) when keep, else the one work tile.
  auto pass0_scores = [&](int64_t kt) { return keep ? w.kept.data() + kt * kBlockQ * kBlockK : w.S.data(); };
  load_rows(w.Q.data(), P.Dp, kBlockQ, P.q.row(b, h, i0), P.q.s2, P.q.s3, n_rows, P.D, P.scale);
  for (int64_t r = 0; r < n_rows; ++r) {
    w.rows[r] = i0 + r;
    w.cand[r].reset();
    w.row_max[r] = ninf;
    w.count[r] = 0;
    w.bad[r] = 0;
  }

  // Pass 0: row max, unmasked count, NaN/+inf, candidates; block maxima.
  for (int64_t kt = 0; kt < n_kt; ++kt) {
    const int64_t cols = P.key_cols(kt);
    acc_t* S = pass0_scores(kt);
    gemm(S, kBlockK, w.Q.data(), P.Dp, 1, tiles.get(kKeysT, b, hk, kt), cols, n_rows, cols, P.D);
    mask_scores(S, w.rows.data(), n_rows, cols, b, h, kt * kBlockK, P);
    acc_t bmax = ninf;
    for (int64_t r = 0; r < n_rows; ++r) {
      const acc_t* s = S + r * kBlockK;
      const RowScan<acc_t> scan = scan_row(s, cols);
      w.row_max[r] = std::max(w.row_max[r], scan.max);
      w.count[r] += scan.count;
      w.bad[r] |= scan.bad;
      bmax = std::max(bmax, scan.max);
      RowCandidates<acc_t, kCandidates>& cand = w.cand[r];
      if (cand.count == kCandidates && !(scan.max > cand.value[cand.min_slot])) {
        cand.max_rejected = std::max(cand.max_rejected, scan.max);  // nothing here beats the kept scores
        continue;
      }
      for (int64_t j = 0; j < cols; ++j)
        if (s[j] > ninf) cand.offer(s[j]);
    }
    w.block_max[kt] = bmax;
  }
  bool any_bad = false;
  for (int64_t r = 0; r < n_rows; ++r) {
    w.th[r].start(P.alpha_at(b, h, i0 + r), w.row_max[r], w.count[r], w.bad[r] != 0, w.cand[r]);
    any_bad |= w.th[r].kind == RowThreshold<acc_t>::kBad;
  }

  // Threshold passes, then the output pass at the thresholds they settle on; again for the
  // rows whose finder does not accept the output pass's evaluation (rare: see RowThreshold).
  for (;;) {
    // Threshold passes over the rows still iterating (scores kept, or recomputed from
    // their queries gathered into Qc).
    for (;;) {
      int64_t n_pending = 0;
      for (int64_t r = 0; r < n_rows; ++r)
        if (!w.th[r].ready) w.pending[n_pending++] = r;
      if (n_pending == 0) break;
      for (int64_t c = 0; c < n_pending; ++c) {
        const int64_t r = w.pending[c];
        if (!keep) std::memcpy(w.Qc.data() + c * P.Dp, w.Q.data() + r * P.Dp, sizeof(acc_t) * P.Dp);
        w.rows[c] = i0 + r;
        w.F[c] = 0;
        w.minus_dF[c] = 0;
      }
      for (int64_t kt = 0; kt < n_kt; ++kt) {
        bool needed = false;
        for (int64_t c = 0; c < n_pending && !needed; ++c) {
          const RowThreshold<acc_t>& th = w.th[w.pending[c]];
          needed = !zero_at_or_above(w.block_max[kt] - th.m, th.lo, th.eps);
        }
        if (!needed) continue;
        const int64_t cols = P.key_cols(kt);
        if (!keep) {
          gemm(w.S.data(), kBlockK, w.Qc.data(), P.Dp, 1, tiles.get(kKeysT, b, hk, kt), cols, n_pending, cols, P.D);
          mask_scores(w.S.data(), w.rows.data(), n_pending, cols, b, h, kt * kBlockK, P);
        }
        for (int64_t c = 0; c < n_pending; ++c) {
          const RowThreshold<acc_t>& th = w.th[w.pending[c]];
          if (zero_at_or_above(w.block_max[kt] - th.m, th.lo, th.eps)) continue;
          const acc_t* s = keep ? pass0_scores(kt) + w.pending[c] * kBlockK : w.S.data() + c * kBlockK;
          acc_t f = 0, dz = 0;
          row_entries<acc_t>(s, w.Pt.data() + c * kBlockK, cols, th.m, th.t(), th.eps, th.inv_eps, &f, &dz);
          w.F[c] += f;
          w.minus_dF[c] += dz;
        }
      }
      for (int64_t c = 0; c < n_pending; ++c)
        w.th[w.pending[c]].update(static_cast<acc_t>(w.F[c]), static_cast<acc_t>(-w.minus_dF[c]));
    }

    // Output pass: p.V over the blocks that are not zero for every row.
    for (int64_t r = 0; r < n_rows; ++r) {
      w.rows[r] = i0 + r;
      w.F[r] = 0;
      w.minus_dF[r] = 0;
    }
    w.O.zero();
    uint8_t* map_row = block_map + P.map_index(b, h, qt, 0);
    for (int64_t kt = 0; kt < P.nK; ++kt) map_row[kt] = 0;
    for (int64_t kt = 0; kt < n_kt; ++kt) {
      bool active = false;
      for (int64_t r = 0; r < n_rows && !active; ++r) {
        const RowThreshold<acc_t>& th = w.th[r];
        if (th.computes())
          active = !zero_at_or_above(w.block_max[kt] - th.m, th.t(), th.eps);
      }
      // A bad row's gradient is NaN wherever it can attend (the backward visits its blocks).
      map_row[kt] = (active || (any_bad && w.block_max[kt] > ninf)) ? 1 : 0;
      if (!active) continue;
      const int64_t cols = P.key_cols(kt);
      const acc_t* S = pass0_scores(kt);
      if (!keep) {
        gemm(w.S.data(), kBlockK, w.Q.data(), P.Dp, 1, tiles.get(kKeysT, b, hk, kt), cols, n_rows, cols, P.D);
        mask_scores(w.S.data(), w.rows.data(), n_rows, cols, b, h, kt * kBlockK, P);
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        const RowThreshold<acc_t>& th = w.th[r];
        acc_t* p = w.Pt.data() + r * kBlockK;
        const bool computing = th.computes();
        if (!computing || zero_at_or_above(w.block_max[kt] - th.m, th.t(), th.eps)) {
          std::memset(static_cast<void*>(p), 0, sizeof(acc_t) * cols);
          continue;
        }
        acc_t f = 0, dz = 0;
        row_entries<acc_t>(S + r * kBlockK, p, cols, th.m, th.t(), th.eps, th.inv_eps, &f, &dz);
        w.F[r] += f;
        w.minus_dF[r] += dz;
      }
      gemm_acc(w.O.data(), P.Dvp, w.Pt.data(), kBlockK, 1, tiles.get(kValues, b, hk, kt), P.Dvp, n_rows, P.Dvp,
               cols);
    }

    bool accepted = true;
    for (int64_t r = 0; r < n_rows; ++r)
      accepted &= w.th[r].check_output(static_cast<acc_t>(w.F[r]), static_cast<acc_t>(-w.minus_dF[r]));
    if (accepted) break;
  }

  // Normalise by sum p and save the row statistics.
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t i = i0 + r;
    const RowThreshold<acc_t>& th = w.th[r];
    scalar_t* o = out + ((b * P.Hq + h) * P.Lq + i) * P.Dv;
    acc_t m = th.m, t = th.t(), inv_norm;
    acc_t o_scale;
    if (th.kind == RowThreshold<acc_t>::kBad) {
      m = t = inv_norm = o_scale = math::quiet_nan<acc_t>();
    } else if (th.kind == RowThreshold<acc_t>::kEmpty) {
      m = ninf;
      t = inv_norm = o_scale = acc_t(0);
    } else {
      inv_norm = static_cast<acc_t>(1.0 / w.F[r]);
      o_scale = inv_norm;
    }
    const acc_t* orow = w.O.data() + r * P.Dvp;  // bad and empty rows: O = 0, scaled by NaN or 0
    for (int64_t d = 0; d < P.Dv; ++d) o[d] = static_cast<scalar_t>(orow[d] * o_scale);
    stats[P.stat_index(b, h, kStatMax, i)] = m;
    stats[P.stat_index(b, h, kStatThreshold, i)] = t;
    stats[P.stat_index(b, h, kStatInvNorm, i)] = inv_norm;
    const bool computed = th.computes();
    stats[P.stat_index(b, h, kStatEvaluations, i)] = static_cast<acc_t>(computed ? th.evaluations : 0);
  }
}

// ------------------------------------------------------------------ backward

template <typename scalar_t, typename acc_t>
struct BackwardScratch {
  Buffer<acc_t> Q, dO, S, dP, P, G, acc_d, acc_dv;
  Buffer<acc_t> kept_S, kept_dP;  // kKeptScoreTiles tiles of S and dP [kt][row][key]
  Buffer<acc_t> acc_dk;            // dK of one key tile in the query-tile sweep (query_tile_owns_keys)
  std::vector<BackwardRow<acc_t>> row;
  std::vector<acc_t> q;
  std::vector<char> bad;
  std::vector<int64_t> rows;
  std::vector<BackwardSums<double>> sums;
  explicit BackwardScratch(const Problem<scalar_t, acc_t>& P)
      : Q(kBlockQ * P.Dp), dO(kBlockQ * P.Dvp), S(kBlockQ * kBlockK), dP(kBlockQ * kBlockK), P(kBlockQ * kBlockK),
        G(kBlockQ * kBlockK),
        acc_d(std::max(kBlockQ, kBlockK) * P.Dp), acc_dv(kBlockK * P.Dvp),
        kept_S(kKeptScoreTiles * kBlockQ * kBlockK), kept_dP(kKeptScoreTiles * kBlockQ * kBlockK),
        acc_dk(kBlockK * P.Dp), row(kBlockQ), q(kBlockQ), bad(kBlockQ), rows(kBlockQ), sums(kBlockQ) {}
};

// Loads what a query tile contributes: scaled queries, dO, and each row's backward constants.
template <typename scalar_t, typename acc_t>
int64_t load_query_side(BackwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                        const View4<scalar_t>& dout, const acc_t* stats, int64_t b, int64_t h, int64_t qt) {
  const int64_t i0 = qt * kBlockQ, n_rows = std::min<int64_t>(kBlockQ, P.Lq - i0);
  load_rows(w.Q.data(), P.Dp, kBlockQ, P.q.row(b, h, i0), P.q.s2, P.q.s3, n_rows, P.D, P.scale);
  load_rows(w.dO.data(), P.Dvp, kBlockQ, dout.row(b, h, i0), dout.s2, dout.s3, n_rows, P.Dv, acc_t(1));
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t i = i0 + r;
    w.rows[r] = i;
    const acc_t m = stats[P.stat_index(b, h, kStatMax, i)], t = stats[P.stat_index(b, h, kStatThreshold, i)],
                n = stats[P.stat_index(b, h, kStatInvNorm, i)];
    w.row[r].load(P.alpha_at(b, h, i), m, t, n);
    w.bad[r] = (m != m) || (t != t) || (n != n) || !(w.row[r].eps >= acc_t(0));
  }
  return n_rows;
}

// S and dP of one block for the loaded query rows (into S and dP, unless they hold
// them already: scores_ready), then p_hat (P) and g (G) per row; with_sums also the
// rows' backward sums.
template <typename scalar_t, typename acc_t>
void backward_block(BackwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                    const KeyTiles<acc_t>& tiles, int64_t b, int64_t h, int64_t kt, int64_t n_rows, bool alpha_grad,
                    bool with_sums, acc_t* S, acc_t* dP, bool scores_ready) {
  const int64_t hk = h / P.group, cols = P.key_cols(kt);
  if (!scores_ready) {
    gemm(S, kBlockK, w.Q.data(), P.Dp, 1, tiles.get(kKeysT, b, hk, kt), cols, n_rows, cols, P.D);
    mask_scores(S, w.rows.data(), n_rows, cols, b, h, kt * kBlockK, P);
    gemm(dP, kBlockK, w.dO.data(), P.Dvp, 1, tiles.get(kValuesT, b, hk, kt), cols, n_rows, cols, P.Dv);
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    acc_t* p = w.P.data() + r * kBlockK;
    acc_t* g = w.G.data() + r * kBlockK;
    if (w.bad[r]) {  // NaN statistics: NaN gradients wherever the row attends
      const acc_t* s = S + r * kBlockK;
      for (int64_t j = 0; j < cols; ++j)
        p[j] = g[j] = s[j] > math::neg_inf<acc_t>() ? math::quiet_nan<acc_t>() : acc_t(0);
      continue;
    }
    if (w.row[r].empty) {
      std::memset(static_cast<void*>(p), 0, sizeof(acc_t) * cols);
      std::memset(static_cast<void*>(g), 0, sizeof(acc_t) * cols);
      continue;
    }
    BackwardSums<double> local;
    local.zero();
    backward_row_entries<acc_t>(S + r * kBlockK, dP + r * kBlockK, p, g, cols, w.row[r],
                                alpha_grad && with_sums, with_sums ? w.sums[r] : local);
  }
}

// dS = g (dP - q) in place of G, over the first cols columns.
template <typename scalar_t, typename acc_t>
void score_gradient(BackwardScratch<scalar_t, acc_t>& w, const acc_t* dP, int64_t n_rows, int64_t cols) {
  for (int64_t r = 0; r < n_rows; ++r) {
    acc_t* g = w.G.data() + r * kBlockK;
    const acc_t* dp = dP + r * kBlockK;
    const acc_t q = w.q[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) g[j] = g[j] * (dp[j] - q);
  }
}

// One query tile is the only one that reaches the keys of its head (Lq <= kBlockQ,
// no key/value head shared by query heads): the query-tile sweep then also computes
// dK and dV from its own P and dS tiles, with the key-tile sweep's sums, and that
// sweep (a third recomputation of S and dP) is skipped.
template <typename scalar_t, typename acc_t>
bool query_tile_owns_keys(const Problem<scalar_t, acc_t>& P) { return P.nQ == 1 && P.group == 1; }

// dV += P^T dO, dK += dS^T (scale q) of one block, for the key rows that hold keys.
template <typename scalar_t, typename acc_t>
void accumulate_key_gradients(BackwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                              int64_t n_rows, int64_t cols, acc_t* dK, acc_t* dV) {
  gemm_acc(dV, P.Dvp, w.P.data(), 1, kBlockK, w.dO.data(), P.Dvp, cols, P.Dvp, n_rows);
  gemm_acc(dK, P.Dp, w.G.data(), 1, kBlockK, w.Q.data(), P.Dp, cols, P.Dp, n_rows);
}

// Writes dK and dV of key tile kt of head (b, hk).
template <typename scalar_t, typename acc_t>
void store_key_gradients(const Problem<scalar_t, acc_t>& P, const acc_t* dK, const acc_t* dV, int64_t b, int64_t hk,
                         int64_t kt, scalar_t* dk, scalar_t* dv) {
  const int64_t j0 = kt * kBlockK, keys = std::min<int64_t>(kBlockK, P.Lk - j0);
  for (int64_t j = 0; j < keys; ++j) {
    scalar_t* ok = dk + ((b * P.Hkv + hk) * P.Lk + j0 + j) * P.D;
    scalar_t* ov = dv + ((b * P.Hkv + hk) * P.Lk + j0 + j) * P.Dv;
    for (int64_t d = 0; d < P.D; ++d) ok[d] = static_cast<scalar_t>(dK[j * P.Dp + d]);
    for (int64_t d = 0; d < P.Dv; ++d) ov[d] = static_cast<scalar_t>(dV[j * P.Dvp + d]);
  }
}

// Query-tile sweep: q_i and the alpha-gradient of each row (first loop over the
// active blocks), then dQ (second loop, scores and dP recomputed, or kept from the
// first loop when the tile sees at most kKeptScoreTiles key tiles).
template <typename scalar_t, typename acc_t>
void backward_query_tile(BackwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                         const KeyTiles<acc_t>& tiles, const View4<scalar_t>& dout, const acc_t* stats,
                         const uint8_t* block_map, bool alpha_grad,
                         int64_t b, int64_t h, int64_t qt, scalar_t* dq, acc_t* q_rows, acc_t* dalpha, scalar_t* dk,
                         scalar_t* dv) {
  const int64_t hk = h / P.group;
  const int64_t n_rows = load_query_side(w, P, dout, stats, b, h, qt);
  const int64_t n_kt = key_tiles_for_query_tile(qt, P.Lq, P.Lk, P.causal);
  const uint8_t* map_row = block_map + P.map_index(b, h, qt, 0);
  const bool keep = n_kt <= kKeptScoreTiles;
  auto tile_S = [&](int64_t kt) { return keep ? w.kept_S.data() + kt * kBlockQ * kBlockK : w.S.data(); };
  auto tile_dP = [&](int64_t kt) { return keep ? w.kept_dP.data() + kt * kBlockQ * kBlockK : w.dP.data(); };
  for (int64_t r = 0; r < n_rows; ++r) w.sums[r].zero();
  for (int64_t kt = 0; kt < n_kt; ++kt) {
    if (!map_row[kt]) continue;
    backward_block(w, P, tiles, b, h, kt, n_rows, alpha_grad, true, tile_S(kt), tile_dP(kt), false);
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t i = qt * kBlockQ + r;
    w.q[r] = w.bad[r] ? math::quiet_nan<acc_t>() : static_cast<acc_t>(backward_q(w.sums[r].g, w.sums[r].g_dy));
    q_rows[(b * P.Hq + h) * P.Lq + i] = w.q[r];
    const acc_t da = alpha_grad ? static_cast<acc_t>(alpha_gradient(w.sums[r])) : acc_t(0);
    dalpha[(b * P.Hq + h) * P.Lq + i] = w.bad[r] ? math::quiet_nan<acc_t>() : da;
  }
  acc_t* dQ = w.acc_d.data();
  std::memset(static_cast<void*>(dQ), 0, sizeof(acc_t) * kBlockQ * P.Dp);
  for (int64_t kt = 0; kt < n_kt; ++kt) {
    if (!map_row[kt]) continue;
    backward_block(w, P, tiles, b, h, kt, n_rows, false, false, tile_S(kt), tile_dP(kt), keep);
    score_gradient(w, tile_dP(kt), n_rows, P.key_cols(kt));
    gemm_acc(dQ, P.Dp, w.G.data(), kBlockK, 1, tiles.get(kKeys, b, hk, kt), P.Dp, n_rows, P.Dp, P.key_cols(kt));
    if (query_tile_owns_keys(P)) {
      std::memset(static_cast<void*>(w.acc_dk.data()), 0, sizeof(acc_t) * kBlockK * P.Dp);
      std::memset(static_cast<void*>(w.acc_dv.data()), 0, sizeof(acc_t) * kBlockK * P.Dvp);
      accumulate_key_gradients(w, P, n_rows, P.key_cols(kt), w.acc_dk.data(), w.acc_dv.data());
      store_key_gradients(P, w.acc_dk.data(), w.acc_dv.data(), b, hk, kt, dk, dv);
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    scalar_t* out = dq + ((b * P.Hq + h) * P.Lq + qt * kBlockQ + r) * P.D;
    const acc_t scale = w.bad[r] ? math::quiet_nan<acc_t>() : P.scale;
    for (int64_t d = 0; d < P.D; ++d) out[d] = static_cast<scalar_t>(dQ[r * P.Dp + d] * scale);
  }
}

// Key-tile sweep: dK and dV of one key tile, over every query head of its group
// and every query tile whose block is active.
template <typename scalar_t, typename acc_t>
void backward_key_tile(BackwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                       const KeyTiles<acc_t>& tiles, const View4<scalar_t>& dout, const acc_t* stats,
                       const uint8_t* block_map, const acc_t* q_rows,
                       int64_t b, int64_t hk, int64_t kt, scalar_t* dk, scalar_t* dv) {
  acc_t* dK = w.acc_d.data();
  acc_t* dV = w.acc_dv.data();
  const int64_t cols = P.key_cols(kt);
  std::memset(static_cast<void*>(dK), 0, sizeof(acc_t) * kBlockK * P.Dp);
  std::memset(static_cast<void*>(dV), 0, sizeof(acc_t) * kBlockK * P.Dvp);
  for (int64_t g = 0; g < P.group; ++g) {
    const int64_t h = hk * P.group + g;
    for (int64_t qt = first_query_tile_for_key_tile(kt, P.Lq, P.Lk, P.causal); qt < P.nQ; ++qt) {
      if (kt >= key_tiles_for_query_tile(qt, P.Lq, P.Lk, P.causal) || !block_map[P.map_index(b, h, qt, kt)]) continue;
      const int64_t n_rows = load_query_side(w, P, dout, stats, b, h, qt);
      for (int64_t r = 0; r < n_rows; ++r) w.q[r] = q_rows[(b * P.Hq + h) * P.Lq + qt * kBlockQ + r];
      backward_block(w, P, tiles, b, h, kt, n_rows, false, false, w.S.data(), w.dP.data(), false);
      score_gradient(w, w.dP.data(), n_rows, cols);
      accumulate_key_gradients(w, P, n_rows, cols, dK, dV);
    }
  }
  store_key_gradients(P, dK, dV, b, hk, kt, dk, dv);
}

// ------------------------------------------------------------------ ops

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> make_problem(const Shape& s, const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& alpha, const std::optional<Tensor>& mask, int64_t causal,
                                      double scale) {
  Problem<scalar_t, acc_t> P;
  P.B = s.B; P.Hq = s.Hq; P.Hkv = s.Hkv; P.group = s.Hq / s.Hkv;
  P.Lq = s.Lq; P.Lk = s.Lk; P.D = s.D; P.Dv = s.Dv;
  P.nQ = num_tiles(s.Lq, kBlockQ);
  P.nK = num_tiles(s.Lk, kBlockK);
  P.causal = causal;
  P.offset = causal_offset(causal, s.Lq, s.Lk);
  P.Dp = padded_dim<acc_t>(s.D);
  P.Dvp = padded_dim<acc_t>(s.Dv);
  P.scale = static_cast<acc_t>(scale);
  P.q = View4<scalar_t>(q);
  P.k = View4<scalar_t>(k);
  P.v = View4<scalar_t>(v);
  P.alpha = alpha.const_data_ptr<acc_t>();
  P.as0 = alpha.stride(0); P.as1 = alpha.stride(1); P.as2 = alpha.stride(2);
  P.mask_kind = kNoMask;
  if (mask.has_value()) {
    if (mask->scalar_type() == ScalarType::Bool) {
      P.mask_kind = kBoolMask;
      P.bool_mask = View4<bool>(*mask);
    } else {
      P.mask_kind = kAdditiveMask;
      P.add_mask = View4<acc_t>(*mask);
    }
  }
  return P;
}

std::tuple<Tensor, Tensor, Tensor> attention_forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& alpha, std::optional<Tensor> mask,
                                                         int64_t causal, double scale) {
  const Shape s = check_attention_args("attention_forward", q, k, v, alpha, mask, causal);
  ENTMAX_CHECK(q.is_cpu(), "attention_forward (CPU): tensors must be on the CPU");
  const int64_t nQ = num_tiles(s.Lq, kBlockQ), nK = num_tiles(s.Lk, kBlockK);
  Tensor out = torch::stable::new_empty(q, {s.B, s.Hq, s.Lq, s.Dv});
  Tensor stats = torch::stable::new_empty(alpha, {s.B, s.Hq, kNumStats, s.Lq});
  Tensor block_map = torch::stable::new_empty(q, {s.B, s.Hq, nQ, nK}, ScalarType::Byte);
  if (s.B * s.Hq * s.Lq == 0) return std::make_tuple(out, stats, block_map);
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const Problem<scalar_t, acc_t> P = make_problem<scalar_t, acc_t>(s, q, k, v, alpha, mask, causal, scale);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    uint8_t* map = block_map.mutable_data_ptr<uint8_t>();
    const KeyTiles<acc_t> tiles = prepare_key_tiles(P, alpha, {kKeysT, kValues});
    torch::stable::parallel_for(0, P.B * P.Hq * P.nQ, 1, [&](int64_t begin, int64_t end) {
      ForwardScratch<scalar_t, acc_t> w(P);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / P.nQ, qt = zigzag(item % P.nQ, P.nQ);
        forward_query_tile(w, P, tiles, bh / P.Hq, bh % P.Hq, qt, o, st, map);
      }
    });
  });
  return std::make_tuple(out, stats, block_map);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward_cpu(const Tensor& grad_out, const Tensor& q,
                                                                  const Tensor& k, const Tensor& v,
                                                                  const Tensor& alpha, std::optional<Tensor> mask,
                                                                  int64_t causal, double scale, const Tensor& stats,
                                                                  const Tensor& block_map, bool alpha_grad) {
  const Shape s = check_attention_backward_args(grad_out, q, k, v, alpha, mask, causal, stats, block_map);
  ENTMAX_CHECK(q.is_cpu(), "attention_backward (CPU): tensors must be on the CPU");
  Tensor dq = torch::stable::new_empty(q, {s.B, s.Hq, s.Lq, s.D});
  Tensor dk = torch::stable::new_zeros(k, {s.B, s.Hkv, s.Lk, s.D});
  Tensor dv = torch::stable::new_zeros(v, {s.B, s.Hkv, s.Lk, s.Dv});
  Tensor dalpha = torch::stable::new_zeros(alpha, {s.B, s.Hq, s.Lq});
  if (s.B * s.Hq * s.Lq == 0) return std::make_tuple(dq, dk, dv, dalpha);
  Tensor q_rows = torch::stable::new_empty(alpha, {s.B, s.Hq, s.Lq});
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const Problem<scalar_t, acc_t> P = make_problem<scalar_t, acc_t>(s, q, k, v, alpha, mask, causal, scale);
    const View4<scalar_t> dout(grad_out);
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const uint8_t* map = block_map.const_data_ptr<uint8_t>();
    acc_t* qr = q_rows.mutable_data_ptr<acc_t>();
    acc_t* da = dalpha.mutable_data_ptr<acc_t>();
    scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
    scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
    scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
    const KeyTiles<acc_t> tiles = prepare_key_tiles(P, alpha, {kKeysT, kKeys, kValuesT});
    torch::stable::parallel_for(0, P.B * P.Hq * P.nQ, 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<scalar_t, acc_t> w(P);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / P.nQ, qt = zigzag(item % P.nQ, P.nQ);
        backward_query_tile(w, P, tiles, dout, st, map, alpha_grad, bh / P.Hq, bh % P.Hq, qt, dqp, qr, da, dkp,
                            dvp);
      }
    });
    if (P.Lk == 0 || query_tile_owns_keys(P)) return;  // dK, dV zero or written
    torch::stable::parallel_for(0, P.B * P.Hkv * P.nK, 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<scalar_t, acc_t> w(P);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / P.nK, kt = zigzag(item % P.nK, P.nK);
        backward_key_tile(w, P, tiles, dout, st, map, qr, bh / P.Hkv, bh % P.Hkv, kt, dkp, dvp);
      }
    });
  });
  return std::make_tuple(dq, dk, dv, dalpha);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda, CPU, m) {
  m.impl("attention_forward", TORCH_BOX(&entmax_cuda::attention_forward_cpu));
  m.impl("attention_backward", TORCH_BOX(&entmax_cuda::attention_backward_cpu));
}
