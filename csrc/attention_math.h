// Per-row and per-block math of the fused alpha-entmax attention, shared by the
// CPU kernel and the CUDA kernel (docs/attention.md is the design both follow).
//
// No torch here: plain functions and small structs on scalars that compile as
// host code and as device code. The entmax row math itself (entry at a
// threshold, the safeguarded root finder, the backward sums) comes from
// entmax_math.h; this header adds what tiles of recomputed scores need.
#pragma once

#include "entmax_math.h"

#include <cstdint>

namespace entmax_cuda {
namespace attention {

using math::EntryAtT;
using math::RootFinder;
using math::abs_;
using math::entry_at_t;
using math::exp_;
using math::log_;
using math::max_;
using math::neg_inf;
using math::quiet_nan;
using math::threshold_upper_bound;

// Tile sizes: a query tile of kBlockQ rows against a key tile of kBlockK keys
// is one block of the block map (one byte per block, saved by the forward).
// Both devices use this grid, so a map written by either is read the same way.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
// Largest head dimension (of q/k and of v) the kernels accept.
constexpr int64_t kMaxHeadDim = 256;
// Scores kept per row in pass 0 for the first threshold guess (CPU: the exact
// top kCandidates; any subset of a row gives a valid lower bound).
constexpr int kCandidates = 16;

// Row statistics saved by the forward, one plane each: stats[b][h][k][i].
enum RowStat : int64_t {
  kStatMax = 0,        // m: the row max of the scores (-inf: every key masked; NaN: bad row)
  kStatThreshold = 1,  // t: p = [1 + eps (s - m - t)]_+^(1/eps), exp(s - m - t) at eps = 0
  kStatInvNorm = 2,    // 1 / sum_j p: the forward's normalisation (0 for an all-masked row)
  kStatEvaluations = 3,  // threshold evaluations of the row, the output pass included (diagnostic)
  kNumStats = 4,
};

// is_causal: key j is visible to query i iff j <= i + causal offset.
enum CausalKind : int64_t { kNotCausal = 0, kCausalUpperLeft = 1, kCausalLowerRight = 2 };

ENTMAX_HD int64_t num_tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Keys [lo, hi) (empty when hi <= lo): the keys a query row may see, or the
// tiles a tile visits.
struct KeyRange {
  int64_t lo, hi;
  ENTMAX_HD bool empty() const { return hi <= lo; }
  ENTMAX_HD bool contains(int64_t x) const { return lo <= x && x < hi; }
};

// Which keys the query rows of one sequence see (Lq rows, Lk keys, both local to
// the sequence). Row i is aligned with key i + diag, diag = Lk - Lq (bottom-right,
// flash-attn's convention for windows and ALiBi). Key j is visible to row i iff
//   j < Lk,
//   causal:  j <= i + causal_off (0 upper-left, diag lower-right),
//   window:  i + diag - left <= j <= i + diag + right (left/right -1: unbounded),
// and a mask, if any, keeps it. ALiBi adds -slope |i + diag - j| to the score.
// The visible range [lo(i), hi(i)) has lo and hi nondecreasing in i, so a tile's
// rows see the union [lo(first row), hi(last row)), and the tiles outside it are
// never visited.
struct RowGeometry {
  int64_t Lq, Lk, diag, causal_off, left, right;
  bool causal;

  // A window side at least as wide as the sequence bounds nothing (left >= Lk, right >= Lq):
  // it becomes -1, so no sum below overflows whatever int64 the caller passed.
  ENTMAX_HD RowGeometry(int64_t Lq_, int64_t Lk_, int64_t causal_kind, int64_t left_, int64_t right_)
      : Lq(Lq_), Lk(Lk_), diag(Lk_ - Lq_), causal_off(causal_kind == kCausalLowerRight ? Lk_ - Lq_ : 0),
        left(left_ >= Lk_ ? -1 : left_), right(right_ >= Lq_ ? -1 : right_), causal(causal_kind != kNotCausal) {}

  ENTMAX_HD KeyRange keys_of_row(int64_t i) const {
    int64_t lo = 0, hi = Lk;
    if (causal && i + causal_off + 1 < hi) hi = i + causal_off + 1;
    if (right >= 0 && i + diag + right + 1 < hi) hi = i + diag + right + 1;
    if (left >= 0 && i + diag - left > lo) lo = i + diag - left;
    return KeyRange{lo, hi};
  }

  // Key tiles the query tile qt visits (its rows' ranges together).
  ENTMAX_HD KeyRange key_tiles_of_query_tile(int64_t qt) const {
    const int64_t first = qt * kBlockQ, last = (first + kBlockQ < Lq ? first + kBlockQ : Lq) - 1;
    if (last < first) return KeyRange{0, 0};
    const int64_t lo = keys_of_row(first).lo, hi = keys_of_row(last).hi;
    if (hi <= lo) return KeyRange{0, 0};
    return KeyRange{lo / kBlockK, num_tiles(hi, kBlockK)};
  }

  // Query tiles with a row that may see a key of key tile kt (a superset of
  // those whose key_tiles_of_query_tile contain kt; callers test both).
  ENTMAX_HD KeyRange query_tiles_of_key_tile(int64_t kt) const {
    const int64_t j0 = kt * kBlockK, j1 = (j0 + kBlockK < Lk ? j0 + kBlockK : Lk) - 1;
    int64_t first = 0, last = Lq - 1;  // rows with hi(i) > j0 and lo(i) <= j1
    if (causal && j0 - causal_off > first) first = j0 - causal_off;
    if (right >= 0 && j0 - diag - right > first) first = j0 - diag - right;
    if (left >= 0 && j1 - diag + left < last) last = j1 - diag + left;
    if (j1 < j0 || last < first) return KeyRange{0, 0};
    return KeyRange{first / kBlockQ, last / kBlockQ + 1};
  }
};

// Where sequence b of a call lies: batch index rb of the row and key tensors, its first
// query row q0 and key k0 there, and its lengths. Padded batch (cu_q null): rb = b, q0 =
// k0 = 0, Lq, and Lk or used_k[b] keys; packed sequences: rb = 0 and the offsets' spans.
struct SequenceSpan {
  int64_t rb, q0, Lq, k0, Lk;
};
ENTMAX_HD SequenceSpan sequence_span(int64_t b, const int32_t* cu_q, const int32_t* cu_k, const int32_t* used_k,
                                     int64_t Lq, int64_t Lk) {
  if (cu_q != nullptr) return SequenceSpan{0, cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]};
  return SequenceSpan{b, 0, Lq, 0, used_k != nullptr ? used_k[b] : Lk};
}

// ALiBi's bias of key j for row i: -slope |i + diag - j|.
template <typename T>
ENTMAX_HD T alibi_bias(T slope, int64_t i, int64_t j, int64_t diag) {
  const int64_t d = i + diag - j;
  return -slope * static_cast<T>(d < 0 ? -d : d);
}

// One score at threshold t: p = [1 + eps (u - t)]_+^(1/eps) (u = s - m), and p/z
// = p^(2 - alpha), the entry's share of -f'(t); softmax (exp(u - t)) at eps = 0.
// alpha = 1.5 and 2 need no special function: p = z^2 and p = z (z = 1 + eps (u - t)).
template <typename T>
ENTMAX_HD EntryAtT<T> score_entry(T u, T t, T eps, T inv_eps) {
  if (eps == T(0)) {
    const T p = exp_(u - t);
    return EntryAtT<T>{p, p};
  }
  if (eps == T(0.5) || eps == T(1)) {
    const T a = eps * (u - t);
    if (!(a > T(-1))) return EntryAtT<T>{T(0), T(0)};
    const T z = T(1) + a;
    return eps == T(1) ? EntryAtT<T>{z, T(1)} : EntryAtT<T>{z * z, z};
  }
  return entry_at_t(u, t, eps, inv_eps);
}

// True when a score u = s - m is exactly 0 at every threshold >= t. Applied
// to a block's max score it proves the whole block zero for that row: the
// comparison is the one score_entry makes, and it is monotone in u, so no
// smaller score of the block can pass it.
template <typename T>
ENTMAX_HD bool zero_at_or_above(T u, T t, T eps) {
  if (u == neg_inf<T>()) return true;
  return eps > T(0) && !(eps * (u - t) > T(-1));
}

// The largest scores of one row seen so far (pass 0), and the largest score
// not kept. Any subset of a row gives a threshold below the row's own (every
// p_j(t) >= 0 and decreasing in t), and when every score left out is zero at
// the subset's threshold, the subset's threshold is the row's.
template <typename T, int K>
struct RowCandidates {
  T value[K];
  int count;
  int min_slot;
  T max_rejected;

  ENTMAX_HD void reset() {
    count = 0;
    min_slot = 0;
    max_rejected = neg_inf<T>();
  }

  ENTMAX_HD void offer(T s) {
    if (count < K) {
      value[count] = s;
      if (count == 0 || s < value[min_slot]) min_slot = count;
      ++count;
      return;
    }
    if (!(s > value[min_slot])) {
      max_rejected = max_(max_rejected, s);
      return;
    }
    max_rejected = max_(max_rejected, value[min_slot]);
    value[min_slot] = s;
    for (int c = 0; c < K; ++c)
      if (value[c] < value[min_slot]) min_slot = c;
  }
};

// Root of sum_{j in subset} p_j(t) = 1 for scores u[0, n) (u = s - m <= 0):
// the first lower bound of the row's threshold (RootFinder over the subset).
template <typename T>
ENTMAX_HD T subset_threshold(const T* u, int n, T eps) {
  const T inv_eps = T(1) / eps;
  RootFinder<T> rf(threshold_upper_bound(eps, static_cast<T>(n)), eps);
  for (;;) {
    T F = 0, minus_dF = 0;
    for (int j = 0; j < n; ++j) {
      const EntryAtT<T> e = score_entry(u[j], rf.t, eps, inv_eps);
      F += e.p;
      minus_dF += e.p_over_z;
    }
    if (rf.update(F, -minus_dF)) break;  // (also at the iteration cap)
  }
  return rf.t;
}

// Threshold search of one query row over passes of recomputed key tiles.
//
// start(): from pass 0's statistics. Rows that are settled at once: a bad row
// (NaN or +inf score, alpha NaN, < 1 or inf), an all-masked row, a softmax row
// (eps = 0: any t works, the output is normalised; t = 0), and a row whose
// candidate subset provably holds its whole support. The others iterate:
// each threshold pass evaluates F(t) = sum p and F'(t) at t() over all key tiles
// and calls update(). The iteration runs in the shifted variable t - lo, lo the
// subset's threshold, so RootFinder starts at lo with bracket [lo, upper].
// A row is ready when its finder is done, or predicts that the next evaluation is
// final: that evaluation is the output pass, whose F and F' go to check_output().
// If the finder does not accept them (the prediction failed: the residual there is
// above tolerance), the row iterates again and the output pass is repeated, so every
// output comes from an evaluation the finder accepted.
template <typename T>
struct RowThreshold {
  enum Kind { kIterate = 0, kBad = 1, kEmpty = 2, kSettled = 3 };
  T eps, inv_eps, m, lo;
  RootFinder<T> rf;
  int evaluations;  // threshold and output passes that evaluated the row
  int kind;
  bool ready;

  ENTMAX_HD RowThreshold()
      : eps(0), inv_eps(0), m(0), lo(0), rf(T(0), T(0)), evaluations(0), kind(kEmpty), ready(true) {}

  // The row has entries to compute (not bad, not all masked).
  ENTMAX_HD bool computes() const { return kind == kIterate || kind == kSettled; }

  // alpha: the row's alpha; m: its max score; d: its number of unmasked keys;
  // bad: it holds a NaN or +inf score; cand: its pass-0 candidates.
  template <int K>
  ENTMAX_HD void start(T alpha, T row_max, int64_t d, bool bad, const RowCandidates<T, K>& cand) {
    eps = alpha - T(1);
    m = row_max;
    lo = T(0);
    rf = RootFinder<T>(T(0), eps);
    evaluations = 0;
    ready = true;
    if (bad || !(eps >= T(0)) || eps == -neg_inf<T>()) {
      kind = kBad;
      return;
    }
    if (d == 0) {
      kind = kEmpty;
      return;
    }
    kind = kSettled;
    if (eps == T(0)) {
      inv_eps = T(0);
      return;
    }
    inv_eps = T(1) / eps;
    T u[K];
    for (int c = 0; c < cand.count; ++c) u[c] = cand.value[c] - m;
    lo = subset_threshold(u, cand.count, eps);
    if (zero_at_or_above(cand.max_rejected - m, lo, eps)) return;  // the subset holds the support
    kind = kIterate;
    ready = false;
    const T upper = threshold_upper_bound(eps, static_cast<T>(d)) - lo;
    rf = RootFinder<T>(upper > T(0) ? upper : T(0), eps);
    rf.origin = lo;
  }

  // The threshold to evaluate next (and, once ready, the final one).
  ENTMAX_HD T t() const { return lo + rf.t; }

  // A threshold pass: F = sum_j p_j(t()), dF = -sum_j p_j/z_j, over the whole row.
  ENTMAX_HD void update(T F, T dF) {
    ++evaluations;
    ready = rf.update(F, dF) || rf.expect_final;
  }

  // The output pass's F and dF at t() (every computing row). Returns whether its output
  // stands: false when an iterating row's finder does not accept the evaluation (the row
  // is then pending again and the output pass must be repeated).
  ENTMAX_HD bool check_output(T F, T dF) {
    if (computes()) ++evaluations;
    if (kind != kIterate) return true;
    ready = rf.update(F, dF);
    return ready;
  }
};

// One entry of the backward: the forward's normalised p_hat and its weight g = p_hat^(2 - alpha).
template <typename T>
struct BackwardEntry {
  T p_hat;
  T g;
};

// What the backward needs of one query row, from the saved statistics.
// p_hat = p(u - t) * inv_norm is the forward's normalised output entry and
// g = p_hat^(2 - alpha) = (p / z) * inv_norm^(1 - eps).
template <typename T>
struct BackwardRow {
  T eps, inv_eps, m, t, inv_norm, g_scale;
  bool empty;  // all keys masked: no entry, zero gradient

  ENTMAX_HD void load(T alpha, T row_max, T threshold, T norm_inverse) {
    eps = alpha - T(1);
    inv_eps = eps > T(0) ? T(1) / eps : T(0);
    m = row_max;
    t = threshold;
    inv_norm = norm_inverse;
    empty = inv_norm == T(0);
    g_scale = empty ? T(0) : (eps == T(0) ? inv_norm : exp_((T(1) - eps) * log_(inv_norm)));
  }

  // p_hat and g at score u = s - m (0 and 0 off the support).
  ENTMAX_HD BackwardEntry<T> entry(T u) const {
    const EntryAtT<T> e = score_entry(u, t, eps, inv_eps);
    return BackwardEntry<T>{e.p * inv_norm, e.p_over_z * g_scale};
  }
};

}  // namespace attention
}  // namespace entmax_cuda
