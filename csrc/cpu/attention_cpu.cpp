// CPU kernels of the fused alpha-entmax attention (docs/attention.md).
//
// Sequences: a padded batch (optionally seqused_k keys per entry) or packed
// sequences (cu_seqlens); every tile lies in one sequence, and each query row sees
// the key range of RowGeometry (causal, window) in its own sequence, scores with
// ALiBi and the mask added (attention_math.h).
// Forward: parallel over (sequence, head, query tile); per query tile, pass 0
// (row max, count, candidates, block maxima), threshold passes until every
// row's root finder is on its last evaluation, then the output pass (p.V over
// the key tiles that are not provably zero; repeated for rows whose last evaluation
// the finder does not accept), all with scores recomputed from
// q and k tile by tile. Backward: a query-tile sweep (row sums -> q_i and the
// alpha-gradient, then dQ) and a key-tile sweep (dK, dV); each output element
// is owned by one task, so results do not depend on the thread count.
// Per-thread buffers hold a few tiles; nothing of size Lq x Lk is formed.
// Tiles and matmuls: attention_cpu_tiles.h; per-row loops: attention_cpu_rows.h; the
// problem, its sequences, score rules and key tiles: attention_cpu_problem.h.
#include "attention_cpu_problem.h"
#include "attention_cpu_rows.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace entmax_cuda {
namespace {

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
                        const KeyTiles<acc_t>& tiles, const Seq& sq, int64_t h, int64_t qt, scalar_t* out,
                        acc_t* stats, uint8_t* block_map) {
  const acc_t ninf = math::neg_inf<acc_t>();
  uint8_t* map_row = block_map + P.map_index(sq, h, qt, 0);
  if (qt >= sq.nQ) {  // past the sequence's rows (packed: shorter than max_seqlen_q): no block
    for (int64_t kt = 0; kt < P.nK; ++kt) map_row[kt] = 0;
    return;
  }
  const int64_t hk = h / P.group, i0 = qt * kBlockQ, n_rows = std::min<int64_t>(kBlockQ, sq.Lq - i0);
  const KeyRange key_tiles = sq.geo.key_tiles_of_query_tile(qt);
  const int64_t kt_lo = key_tiles.lo, kt_hi = std::max(key_tiles.lo, key_tiles.hi);
  const bool keep = kt_hi - kt_lo <= kKeptScoreTiles;
  // Score tile kt of pass 0: kept (rows r) when keep, else the one work tile.
  auto pass0_scores = [&](int64_t kt) {
    return keep ? w.kept.data() + (kt - kt_lo) * kBlockQ * kBlockK : w.S.data();
  };
  load_rows(w.Q.data(), P.Dp, kBlockQ, P.q.row(sq.rb, h, sq.q0 + i0), P.q.s2, P.q.s3, n_rows, P.D, P.scale);
  for (int64_t r = 0; r < n_rows; ++r) {
    w.rows[r] = i0 + r;
    w.cand[r].reset();
    w.row_max[r] = ninf;
    w.count[r] = 0;
    w.bad[r] = 0;
  }

  // Pass 0: row max, unmasked count, NaN/+inf, candidates; block maxima.
  for (int64_t kt = kt_lo; kt < kt_hi; ++kt) {
    const int64_t cols = P.key_cols(sq, kt);
    acc_t* S = pass0_scores(kt);
    gemm(S, kBlockK, w.Q.data(), P.Dp, 1, tiles.get(kKeysT, sq, hk, kt), cols, n_rows, cols, P.D);
    mask_scores(S, w.rows.data(), n_rows, cols, sq, h, kt * kBlockK, P);
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
    w.th[r].start(P.alpha_at(sq, h, i0 + r), w.row_max[r], w.count[r], w.bad[r] != 0, w.cand[r]);
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
      for (int64_t kt = kt_lo; kt < kt_hi; ++kt) {
        bool needed = false;
        for (int64_t c = 0; c < n_pending && !needed; ++c) {
          const RowThreshold<acc_t>& th = w.th[w.pending[c]];
          needed = !zero_at_or_above(w.block_max[kt] - th.m, th.lo, th.eps);
        }
        if (!needed) continue;
        const int64_t cols = P.key_cols(sq, kt);
        if (!keep) {
          gemm(w.S.data(), kBlockK, w.Qc.data(), P.Dp, 1, tiles.get(kKeysT, sq, hk, kt), cols, n_pending, cols, P.D);
          mask_scores(w.S.data(), w.rows.data(), n_pending, cols, sq, h, kt * kBlockK, P);
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
    for (int64_t kt = 0; kt < P.nK; ++kt) map_row[kt] = 0;
    for (int64_t kt = kt_lo; kt < kt_hi; ++kt) {
      bool active = false;
      for (int64_t r = 0; r < n_rows && !active; ++r) {
        const RowThreshold<acc_t>& th = w.th[r];
        if (th.computes())
          active = !zero_at_or_above(w.block_max[kt] - th.m, th.t(), th.eps);
      }
      // A bad row's gradient is NaN wherever it can attend (the backward visits its blocks).
      map_row[kt] = (active || (any_bad && w.block_max[kt] > ninf)) ? 1 : 0;
      if (!active) continue;
      const int64_t cols = P.key_cols(sq, kt);
      const acc_t* S = pass0_scores(kt);
      if (!keep) {
        gemm(w.S.data(), kBlockK, w.Q.data(), P.Dp, 1, tiles.get(kKeysT, sq, hk, kt), cols, n_rows, cols, P.D);
        mask_scores(w.S.data(), w.rows.data(), n_rows, cols, sq, h, kt * kBlockK, P);
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
      gemm_acc(w.O.data(), P.Dvp, w.Pt.data(), kBlockK, 1, tiles.get(kValues, sq, hk, kt), P.Dvp, n_rows, P.Dvp,
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
    scalar_t* o = out + P.row_index(sq, h, i) * P.Dv;
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
    stats[P.stat_index(sq, h, kStatMax, i)] = m;
    stats[P.stat_index(sq, h, kStatThreshold, i)] = t;
    stats[P.stat_index(sq, h, kStatInvNorm, i)] = inv_norm;
    const bool computed = th.computes();
    stats[P.stat_index(sq, h, kStatEvaluations, i)] = static_cast<acc_t>(computed ? th.evaluations : 0);
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
                        const View4<scalar_t>& dout, const acc_t* stats, const Seq& sq, int64_t h, int64_t qt) {
  const int64_t i0 = qt * kBlockQ, n_rows = std::min<int64_t>(kBlockQ, sq.Lq - i0);
  load_rows(w.Q.data(), P.Dp, kBlockQ, P.q.row(sq.rb, h, sq.q0 + i0), P.q.s2, P.q.s3, n_rows, P.D, P.scale);
  load_rows(w.dO.data(), P.Dvp, kBlockQ, dout.row(sq.rb, h, sq.q0 + i0), dout.s2, dout.s3, n_rows, P.Dv,
            acc_t(1));
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t i = i0 + r;
    w.rows[r] = i;
    const acc_t m = stats[P.stat_index(sq, h, kStatMax, i)], t = stats[P.stat_index(sq, h, kStatThreshold, i)],
                n = stats[P.stat_index(sq, h, kStatInvNorm, i)];
    w.row[r].load(P.alpha_at(sq, h, i), m, t, n);
    w.bad[r] = (m != m) || (t != t) || (n != n) || !(w.row[r].eps >= acc_t(0));
  }
  return n_rows;
}

// S and dP of one block for the loaded query rows (into S and dP, unless they hold
// them already: scores_ready), then p_hat (P) and g (G) per row; with_sums also the
// rows' backward sums.
template <typename scalar_t, typename acc_t>
void backward_block(BackwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                    const KeyTiles<acc_t>& tiles, const Seq& sq, int64_t h, int64_t kt, int64_t n_rows,
                    bool alpha_grad, bool with_sums, acc_t* S, acc_t* dP, bool scores_ready) {
  const int64_t hk = h / P.group, cols = P.key_cols(sq, kt);
  if (!scores_ready) {
    gemm(S, kBlockK, w.Q.data(), P.Dp, 1, tiles.get(kKeysT, sq, hk, kt), cols, n_rows, cols, P.D);
    mask_scores(S, w.rows.data(), n_rows, cols, sq, h, kt * kBlockK, P);
    gemm(dP, kBlockK, w.dO.data(), P.Dvp, 1, tiles.get(kValuesT, sq, hk, kt), cols, n_rows, cols, P.Dv);
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

// One query tile is the only one that reaches the keys of its head in sequence sq
// (the sequence has at most one query tile, and no key/value head is shared by query
// heads; key tiles are per sequence, so no other sequence's rows reach them): the
// query-tile sweep then also computes dK and dV from its own P and dS tiles, with
// the key-tile sweep's sums, and that sweep (a third recomputation of S and dP)
// skips the sequence.
template <typename scalar_t, typename acc_t>
bool query_tile_owns_keys(const Problem<scalar_t, acc_t>& P, const Seq& sq) { return sq.nQ <= 1 && P.group == 1; }

// dV += P^T dO, dK += dS^T (scale q) of one block, for the key rows that hold keys.
template <typename scalar_t, typename acc_t>
void accumulate_key_gradients(BackwardScratch<scalar_t, acc_t>& w, const Problem<scalar_t, acc_t>& P,
                              int64_t n_rows, int64_t cols, acc_t* dK, acc_t* dV) {
  gemm_acc(dV, P.Dvp, w.P.data(), 1, kBlockK, w.dO.data(), P.Dvp, cols, P.Dvp, n_rows);
  gemm_acc(dK, P.Dp, w.G.data(), 1, kBlockK, w.Q.data(), P.Dp, cols, P.Dp, n_rows);
}

// Writes dK and dV of key tile kt of head (sq, hk).
template <typename scalar_t, typename acc_t>
void store_key_gradients(const Problem<scalar_t, acc_t>& P, const acc_t* dK, const acc_t* dV, const Seq& sq,
                         int64_t hk, int64_t kt, scalar_t* dk, scalar_t* dv) {
  const int64_t j0 = kt * kBlockK, keys = std::min<int64_t>(kBlockK, sq.Lk - j0);
  for (int64_t j = 0; j < keys; ++j) {
    scalar_t* ok = dk + P.key_index(sq, hk, j0 + j) * P.D;
    scalar_t* ov = dv + P.key_index(sq, hk, j0 + j) * P.Dv;
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
                         const Seq& sq, int64_t h, int64_t qt, scalar_t* dq, acc_t* q_rows, acc_t* dalpha, scalar_t* dk,
                         scalar_t* dv) {
  if (qt >= sq.nQ) return;  // past the sequence's rows
  const int64_t hk = h / P.group;
  const int64_t n_rows = load_query_side(w, P, dout, stats, sq, h, qt);
  const KeyRange key_tiles = sq.geo.key_tiles_of_query_tile(qt);
  const int64_t kt_lo = key_tiles.lo, kt_hi = std::max(key_tiles.lo, key_tiles.hi);
  const uint8_t* map_row = block_map + P.map_index(sq, h, qt, 0);
  const bool keep = kt_hi - kt_lo <= kKeptScoreTiles;
  auto tile_S = [&](int64_t kt) {
    return keep ? w.kept_S.data() + (kt - kt_lo) * kBlockQ * kBlockK : w.S.data();
  };
  auto tile_dP = [&](int64_t kt) {
    return keep ? w.kept_dP.data() + (kt - kt_lo) * kBlockQ * kBlockK : w.dP.data();
  };
  for (int64_t r = 0; r < n_rows; ++r) w.sums[r].zero();
  for (int64_t kt = kt_lo; kt < kt_hi; ++kt) {
    if (!map_row[kt]) continue;
    backward_block(w, P, tiles, sq, h, kt, n_rows, alpha_grad, true, tile_S(kt), tile_dP(kt), false);
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t row = P.row_index(sq, h, qt * kBlockQ + r);
    w.q[r] = w.bad[r] ? math::quiet_nan<acc_t>() : static_cast<acc_t>(backward_q(w.sums[r].g, w.sums[r].g_dy));
    q_rows[row] = w.q[r];
    const acc_t da = alpha_grad ? static_cast<acc_t>(alpha_gradient(w.sums[r])) : acc_t(0);
    dalpha[row] = w.bad[r] ? math::quiet_nan<acc_t>() : da;
  }
  const bool owns_keys = query_tile_owns_keys(P, sq);
  acc_t* dQ = w.acc_d.data();
  std::memset(static_cast<void*>(dQ), 0, sizeof(acc_t) * kBlockQ * P.Dp);
  for (int64_t kt = kt_lo; kt < kt_hi; ++kt) {
    if (!map_row[kt]) continue;
    const int64_t cols = P.key_cols(sq, kt);
    backward_block(w, P, tiles, sq, h, kt, n_rows, false, false, tile_S(kt), tile_dP(kt), keep);
    score_gradient(w, tile_dP(kt), n_rows, cols);
    gemm_acc(dQ, P.Dp, w.G.data(), kBlockK, 1, tiles.get(kKeys, sq, hk, kt), P.Dp, n_rows, P.Dp, cols);
    if (owns_keys) {
      std::memset(static_cast<void*>(w.acc_dk.data()), 0, sizeof(acc_t) * kBlockK * P.Dp);
      std::memset(static_cast<void*>(w.acc_dv.data()), 0, sizeof(acc_t) * kBlockK * P.Dvp);
      accumulate_key_gradients(w, P, n_rows, cols, w.acc_dk.data(), w.acc_dv.data());
      store_key_gradients(P, w.acc_dk.data(), w.acc_dv.data(), sq, hk, kt, dk, dv);
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    scalar_t* out = dq + P.row_index(sq, h, qt * kBlockQ + r) * P.D;
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
                       const Seq& sq, int64_t hk, int64_t kt, scalar_t* dk, scalar_t* dv) {
  if (kt >= sq.nK) return;  // past the sequence's keys
  acc_t* dK = w.acc_d.data();
  acc_t* dV = w.acc_dv.data();
  const int64_t cols = P.key_cols(sq, kt);
  const KeyRange query_tiles = sq.geo.query_tiles_of_key_tile(kt);
  std::memset(static_cast<void*>(dK), 0, sizeof(acc_t) * kBlockK * P.Dp);
  std::memset(static_cast<void*>(dV), 0, sizeof(acc_t) * kBlockK * P.Dvp);
  for (int64_t g = 0; g < P.group; ++g) {
    const int64_t h = hk * P.group + g;
    for (int64_t qt = query_tiles.lo; qt < query_tiles.hi; ++qt) {
      if (!sq.geo.key_tiles_of_query_tile(qt).contains(kt) || !block_map[P.map_index(sq, h, qt, kt)]) continue;
      const int64_t n_rows = load_query_side(w, P, dout, stats, sq, h, qt);
      for (int64_t r = 0; r < n_rows; ++r) w.q[r] = q_rows[P.row_index(sq, h, qt * kBlockQ + r)];
      backward_block(w, P, tiles, sq, h, kt, n_rows, false, false, w.S.data(), w.dP.data(), false);
      score_gradient(w, w.dP.data(), n_rows, cols);
      accumulate_key_gradients(w, P, n_rows, cols, dK, dV);
    }
  }
  store_key_gradients(P, dK, dV, sq, hk, kt, dk, dv);
}

// ------------------------------------------------------------------ ops

// Work item x of a sequence's nQ (or nK) items, of the n of the longest sequence:
// the sequence's tiles in zigzag order, then the items past its tiles (no work).
inline int64_t sequence_tile(int64_t x, int64_t n_seq) { return x < n_seq ? zigzag(x, n_seq) : x; }

std::tuple<Tensor, Tensor, Tensor> attention_forward_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha, std::optional<Tensor> mask,
    int64_t causal, double scale, std::optional<Tensor> alibi_slopes, int64_t window_left, int64_t window_right,
    std::optional<Tensor> cu_seqlens_q, std::optional<Tensor> cu_seqlens_k, std::optional<Tensor> seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const Geometry g = make_geometry(std::move(alibi_slopes), window_left, window_right, std::move(cu_seqlens_q),
                                   std::move(cu_seqlens_k), std::move(seqused_k), max_seqlen_q, max_seqlen_k);
  const Shape s = check_attention_args("attention_forward", q, k, v, alpha, mask, causal, g);
  ENTMAX_CHECK(q.is_cpu(), "attention_forward (CPU): tensors must be on the CPU");
  const int64_t nQ = num_tiles(s.Lq, kBlockQ), nK = num_tiles(s.Lk, kBlockK);
  Tensor out = torch::stable::new_empty(q, {s.rows_b, s.Hq, s.rows_q, s.Dv});
  Tensor stats = torch::stable::new_empty(alpha, {s.rows_b, s.Hq, kNumStats, s.rows_q});
  Tensor block_map = torch::stable::new_empty(q, {s.B, s.Hq, nQ, nK}, ScalarType::Byte);
  if (s.B * s.Hq * s.Lq == 0) return std::make_tuple(out, stats, block_map);
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const Problem<scalar_t, acc_t> P = make_problem<scalar_t, acc_t>(s, q, k, v, alpha, mask, causal, scale, g);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    uint8_t* map = block_map.mutable_data_ptr<uint8_t>();
    const KeyTiles<acc_t> tiles = prepare_key_tiles(P, alpha, {kKeysT, kValues});
    torch::stable::parallel_for(0, P.B * P.Hq * P.nQ, 1, [&](int64_t begin, int64_t end) {
      ForwardScratch<scalar_t, acc_t> w(P);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / P.nQ;
        const Seq sq = P.seq(bh / P.Hq);
        forward_query_tile(w, P, tiles, sq, bh % P.Hq, sequence_tile(item % P.nQ, sq.nQ), o, st, map);
      }
    });
  });
  return std::make_tuple(out, stats, block_map);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha,
    std::optional<Tensor> mask, int64_t causal, double scale, const Tensor& stats, const Tensor& block_map,
    bool alpha_grad, std::optional<Tensor> alibi_slopes, int64_t window_left, int64_t window_right,
    std::optional<Tensor> cu_seqlens_q, std::optional<Tensor> cu_seqlens_k, std::optional<Tensor> seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const Geometry g = make_geometry(std::move(alibi_slopes), window_left, window_right, std::move(cu_seqlens_q),
                                   std::move(cu_seqlens_k), std::move(seqused_k), max_seqlen_q, max_seqlen_k);
  const Shape s = check_attention_backward_args(grad_out, q, k, v, alpha, mask, causal, g, stats, block_map);
  ENTMAX_CHECK(q.is_cpu(), "attention_backward (CPU): tensors must be on the CPU");
  Tensor dq = torch::stable::new_empty(q, {s.rows_b, s.Hq, s.rows_q, s.D});
  Tensor dk = torch::stable::new_zeros(k, {s.rows_b, s.Hkv, s.rows_k, s.D});
  Tensor dv = torch::stable::new_zeros(v, {s.rows_b, s.Hkv, s.rows_k, s.Dv});
  Tensor dalpha = torch::stable::new_zeros(alpha, {s.rows_b, s.Hq, s.rows_q});
  if (s.B * s.Hq * s.Lq == 0) return std::make_tuple(dq, dk, dv, dalpha);
  Tensor q_rows = torch::stable::new_empty(alpha, {s.rows_b, s.Hq, s.rows_q});
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const Problem<scalar_t, acc_t> P = make_problem<scalar_t, acc_t>(s, q, k, v, alpha, mask, causal, scale, g);
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
        const int64_t bh = item / P.nQ;
        const Seq sq = P.seq(bh / P.Hq);
        backward_query_tile(w, P, tiles, dout, st, map, alpha_grad, sq, bh % P.Hq,
                            sequence_tile(item % P.nQ, sq.nQ), dqp, qr, da, dkp, dvp);
      }
    });
    if (P.nK == 0) return;  // no key anywhere: dK, dV zero
    // dK, dV of the sequences whose query tile owns its keys are written (or zero) already.
    torch::stable::parallel_for(0, P.B * P.Hkv * P.nK, 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<scalar_t, acc_t> w(P);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / P.nK;
        const Seq sq = P.seq(bh / P.Hkv);
        if (query_tile_owns_keys(P, sq)) continue;
        backward_key_tile(w, P, tiles, dout, st, map, qr, sq, bh % P.Hkv, sequence_tile(item % P.nK, sq.nK), dkp,
                          dvp);
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
