// The CPU twin of the split-K decoding kernels (cuda/attention_decode_kernel.cuh): the
// entmax_cuda::attention_decode op on the CPU. The same plan (a work item is a chunk of
// kDecodeRows query rows of one key/value head against the key tiles of one split), the
// same three passes per work item (pass 0, threshold passes, the output pass), the same
// merges between them (attention_decode_math.h, shared with the CUDA merge kernel) and
// the same loop over them (run_decode_passes). Work items run in parallel; every sum
// over the splits is taken in split order, so the result does not depend on the threads.
#include "../attention_decode_math.h"
#include "attention_cpu_problem.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <tuple>
#include <vector>

namespace entmax_cuda {
namespace {

// What the passes and merges of one call share (the CUDA op's workspace).
template <typename scalar_t, typename acc_t>
struct DecodeWork {
  const Problem<scalar_t, acc_t>& P;
  DecodePlan plan;
  std::vector<SplitSummary<acc_t>> summary;  // [row][split]: pass 0
  std::vector<acc_t> block_max;              // [row][key tile]: pass 0's max score of the row in the tile
  std::vector<DecodeRow<acc_t>> rows;        // [row]: the threshold searches
  std::vector<double> sums;                  // [row][split][2]: (sum p, sum p/z) of the last pass
  std::vector<acc_t> partial;                // [row][split][Dv]: the output pass's sum p v

  DecodeWork(const Problem<scalar_t, acc_t>& P_, const DecodePlan& plan_)
      : P(P_), plan(plan_), summary(plan_.rows() * plan_.splits), block_max(plan_.rows() * plan_.nK),
        rows(plan_.rows()), sums(plan_.rows() * plan_.splits * 2), partial(plan_.rows() * plan_.splits * P_.Dv) {}
};

// One pass of one work item: pass 0 (pass = kDecodePass0) or a threshold or output pass
// (pass = the phase of the rows it evaluates).
template <typename scalar_t, typename acc_t>
void decode_item(DecodeWork<scalar_t, acc_t>& w, int64_t x, int pass) {
  const Problem<scalar_t, acc_t>& P = w.P;
  const DecodePlan& plan = w.plan;
  const DecodePlan::Item it = plan.item(x);
  const Seq sq = P.seq(it.b);
  const KeyRange tiles = plan.split_tiles(it.split);
  const int64_t S = plan.splits, s = it.split;
  const acc_t ninf = math::neg_inf<acc_t>(), inf = -ninf;
  std::vector<acc_t> q(P.D);
  for (int r = 0; r < kDecodeRows; ++r) {
    int64_t h, i, row;
    if (!plan.row_of(it, r, h, i, row)) break;
    const bool pass0 = pass == kDecodePass0;
    if (!pass0 && !decode_row_evaluates(w.rows[row], pass)) continue;
    const scalar_t* qr = P.q.row(sq.rb, h, i);
    for (int64_t d = 0; d < P.D; ++d) q[d] = static_cast<acc_t>(qr[d * P.q.s3]) * P.scale;
    const KeyRange keys = sq.geo.keys_of_row(i);
    const acc_t slope = P.alibi != nullptr ? P.slope(sq, h) : acc_t(0);
    const int64_t hk = h / P.group;
    acc_t* bm = w.block_max.data() + row * plan.nK;
    const RowThreshold<acc_t>& th = w.rows[row].th;
    acc_t* o = w.partial.data() + (row * S + s) * P.Dv;
    if (pass == kDecodeOutput)
      for (int64_t c = 0; c < P.Dv; ++c) o[c] = acc_t(0);
    acc_t m = ninf;
    int64_t count = 0;
    bool bad = false;
    RowCandidates<acc_t, kCandidates> cand;
    cand.reset();
    double F = 0, minus_dF = 0;
    for (int64_t kt = tiles.lo; kt < tiles.hi; ++kt) {
      const int64_t j0 = std::max(keys.lo, kt * kBlockK), j1 = std::min(keys.hi, (kt + 1) * kBlockK);
      if (pass0) bm[kt] = ninf;
      if (j1 <= j0) continue;
      if (!pass0 && zero_at_or_above(bm[kt] - th.m, th.t(), th.eps)) continue;  // every entry is 0 here
      acc_t tile_max = ninf, f = 0, dz = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* kr = P.k.row(sq.rb, hk, sq.k0 + j);
        acc_t score = 0;
        for (int64_t d = 0; d < P.D; ++d) score += q[d] * static_cast<acc_t>(kr[d * P.k.s3]);
        if (P.alibi != nullptr) score += alibi_bias(slope, i, j, sq.geo.diag);
        if (pass0) {
          bad = bad || !(score < inf);  // NaN or +inf
          if (score == ninf) continue;
          m = math::max_(m, score);
          tile_max = math::max_(tile_max, score);
          ++count;
          cand.offer(score);
          continue;
        }
        const EntryAtT<acc_t> e = score_entry(score - th.m, th.t(), th.eps, th.inv_eps);
        f += e.p;
        dz += e.p_over_z;
        if (pass == kDecodeOutput && e.p != acc_t(0)) {
          const scalar_t* vr = P.v.row(sq.rb, hk, sq.k0 + j);
          for (int64_t c = 0; c < P.Dv; ++c) o[c] += e.p * static_cast<acc_t>(vr[c * P.v.s3]);
        }
      }
      if (pass0) bm[kt] = tile_max;
      F += f;
      minus_dF += dz;
    }
    if (pass0) {
      SplitSummary<acc_t>& sum = w.summary[row * S + s];
      sum.max = m;
      sum.rejected = cand.max_rejected;
      sum.count = count;
      sum.bad = bad ? 1 : 0;
      sum.n_cand = cand.count;
      for (int c = 0; c < cand.count; ++c) sum.cand[c] = cand.value[c];
    } else {
      w.sums[(row * S + s) * 2] = F;
      w.sums[(row * S + s) * 2 + 1] = minus_dF;
    }
  }
}

// The passes and merges of run_decode_passes on the CPU.
template <typename scalar_t, typename acc_t>
struct CpuDecodeRunner {
  DecodeWork<scalar_t, acc_t>& w;
  scalar_t* out;
  acc_t* stats;

  void pass(int phase) {
    torch::stable::parallel_for(0, w.plan.items(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) decode_item(w, x, phase);
    });
  }

  // Runs a merge on every row; returns the rows left in the threshold phase.
  template <class Merge>
  int64_t merge_rows(const Merge& merge) {
    int64_t pending = 0;
    for (int64_t row = 0; row < w.plan.rows(); ++row) {
      merge(row);
      pending += w.rows[row].phase == kDecodeThreshold ? 1 : 0;
    }
    return pending;
  }

  int64_t merge_start() {
    const DecodePlan& plan = w.plan;
    return merge_rows([&](int64_t row) {
      const int64_t bh = row / plan.Lq, i = row % plan.Lq;
      const Seq sq = w.P.seq(bh / plan.Hq);
      decode_merge_start(w.rows[row], w.summary.data() + row * plan.splits, plan.splits,
                         w.P.alpha_at(sq, bh % plan.Hq, i));
    });
  }

  int64_t merge_threshold() {
    return merge_rows([&](int64_t row) {
      decode_merge_threshold(w.rows[row], w.sums.data() + row * w.plan.splits * 2, w.plan.splits);
    });
  }

  int64_t merge_output() {
    const DecodePlan& plan = w.plan;
    const int64_t S = plan.splits, Dv = w.P.Dv;
    return merge_rows([&](int64_t row) {
      DecodeRow<acc_t>& r = w.rows[row];
      if (r.phase != kDecodeOutput) return;
      DecodeFinish<acc_t> fin;
      if (!decode_merge_output(r, w.sums.data() + row * S * 2, S, fin)) return;
      const bool computed = r.th.computes();
      for (int64_t c = 0; c < Dv; ++c) {
        acc_t o = 0;
        if (computed)
          for (int64_t s = 0; s < S; ++s) o += w.partial[(row * S + s) * Dv + c];
        out[row * Dv + c] = static_cast<scalar_t>(o * fin.o_scale);
      }
      write_decode_stats(stats, row, plan.Lq, fin);
    });
  }
};

std::tuple<Tensor, Tensor> attention_decode_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& alpha, double scale,
                                                std::optional<Tensor> alibi_slopes, int64_t window_left,
                                                int64_t window_right, std::optional<Tensor> seqused_k,
                                                int64_t num_splits) {
  const Geometry g = make_geometry(std::move(alibi_slopes), window_left, window_right, std::nullopt, std::nullopt,
                                   std::move(seqused_k), 0, 0);
  const Shape s = check_decode_args(q, k, v, alpha, g, num_splits);
  ENTMAX_CHECK(q.is_cpu(), "attention_decode (CPU): tensors must be on the CPU");
  Tensor out = torch::stable::new_empty(q, {s.B, s.Hq, s.Lq, s.Dv});
  Tensor stats = torch::stable::new_empty(alpha, {s.B, s.Hq, kNumStats, s.Lq});
  if (s.B * s.Hq * s.Lq == 0) return std::make_tuple(out, stats);
  const DecodePlan plan = decode_plan(s, num_splits, torch::stable::get_num_threads());
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const Problem<scalar_t, acc_t> P =
        make_problem<scalar_t, acc_t>(s, q, k, v, alpha, std::nullopt, kCausalLowerRight, scale, g);
    DecodeWork<scalar_t, acc_t> w(P, plan);
    CpuDecodeRunner<scalar_t, acc_t> runner{w, out.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>()};
    ENTMAX_CHECK(run_decode_passes(runner, plan.rows()), "attention_decode: a threshold search did not end");
  });
  return std::make_tuple(out, stats);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda, CPU, m) {
  m.impl("attention_decode", TORCH_BOX(&entmax_cuda::attention_decode_cpu));
}
