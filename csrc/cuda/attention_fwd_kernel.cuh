// The forward kernel of the fused alpha-entmax attention (attention_kernel_common.cuh
// says what each kernel does): per row the max, candidates, the threshold search and the
// output pass, the same stages as the CPU kernel's forward_query_tile.
#pragma once

#include "attention_kernel_common.cuh"

namespace entmax_cuda {
namespace attention_cuda {

// ------------------------------------------------------------------ forward

template <class Gemm>
__device__ __forceinline__ void forward_tile(const AttentionParams& p) {
  using acc_t = typename Gemm::acc_t;
  using scalar_t = typename Gemm::scalar;
  using Threshold = RowThreshold<acc_t>;
  constexpr int NT = Gemm::kChunk / 8;
  ENTMAX_DYNAMIC_SMEM(smem);
  const ForwardSmem<Gemm> layout(p.D, p.Dv, p.n_bm);
  Gemm gemm(smem, layout.dims);
  acc_t* block_max = reinterpret_cast<acc_t*>(smem + layout.block_max);
  acc_t* warp_max = reinterpret_cast<acc_t*>(smem + layout.warp_max);
  const FragCoord fc;
  const int tid = threadIdx.x;

  const QueryTile tile = query_tile_of(p, blockIdx.x);
  const int64_t b = tile.b, h = tile.h, qt = tile.qt, hk = h / p.group;
  const Sequence sq = sequence_of(p, b);
  const int64_t i0 = qt * kTile, Lq = sq.geo.Lq;
  const attention::KeyRange tiles = sq.geo.key_tiles_of_query_tile(qt);  // empty past the sequence's rows
  uint8_t* map_row = p.block_map + ((b * p.Hq + h) * p.nQ + qt) * p.nK;
  for (int64_t kt = tid; kt < p.nK; kt += kThreads)
    if (!tiles.contains(kt)) map_row[kt] = 0;  // never visited
  if (i0 >= Lq) return;  // the whole CTA: a tile past this sequence's queries
  for (int x = tid; x < p.n_bm; x += kThreads) block_max[x] = neg_inf<acc_t>();

  int64_t row_i[2], mask_offset[2];
  attention::KeyRange keys[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_i[r] = i0 + fc.row(r);
    keys[r] = row_keys(sq, row_i[r]);
    mask_offset[r] = mask_row_offset(p, b, h, row_i[r]);
  }
  const acc_t slope = alibi_slope<acc_t>(p, b, h);
  gemm.template load<kX0>(tile_of<scalar_t>(p.q, p.q_st, p.q_vec16, sq.rb, h, sq.q0 + i0, sq.q0 + Lq, p.D),
                          acc_t(p.scale));
  Frag<acc_t, kTileNt> S;

  // S of key tile kt (masked) for every warp with `active`, all threads taking part.
  auto scores = [&](int64_t kt, bool active) {
    __syncthreads();
    gemm.template load<kY0>(
        tile_of<scalar_t>(p.k, p.k_st, p.k_vec16, sq.rb, hk, sq.k0 + kt * kTile, sq.k0 + sq.geo.Lk, p.D), acc_t(1));
    __syncthreads();
    gemm.template xy_t<kX0, kY0>(S, active);
    if (!active) return;
    const int64_t j0 = kt * kTile;
    const BlockCols bc[2] = {block_cols(keys[0], j0), block_cols(keys[1], j0)};
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        S.v[nt][e] = masked(p, S.v[nt][e], bc[e >> 1], mask_offset[e >> 1], j0, fc.col(nt, e), row_i[e >> 1], slope,
                            sq.geo.diag);
  };

  // Pass 0: per row the max, the count of unmasked keys, NaN/+inf, the largest
  // scores; per block the max score.
  acc_t row_max[2] = {neg_inf<acc_t>(), neg_inf<acc_t>()};
  int64_t count[2] = {0, 0};
  bool bad[2] = {false, false};
  acc_t cand[2][kCandidates];
  acc_t rejected[2] = {neg_inf<acc_t>(), neg_inf<acc_t>()};
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < kCandidates; ++c) cand[r][c] = neg_inf<acc_t>();
  for (int64_t kt = tiles.lo; kt < tiles.hi; ++kt) {
    scores(kt, true);
    acc_t tile_max = neg_inf<acc_t>();
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const acc_t x = S.v[nt][e];
        bad[r] |= (x != x) || x == -neg_inf<acc_t>();
        count[r] += x > neg_inf<acc_t>();
        row_max[r] = max_no_nan(row_max[r], x);
        tile_max = max_no_nan(tile_max, x);
        keep_largest(cand[r], rejected[r], x);
      }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) tile_max = max_no_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, m));
    if (fc.lane == 0) warp_max[fc.warp] = tile_max;
    __syncthreads();
    if (tid == 0) {
      acc_t mx = block_max[kt >> p.bm_shift];
      for (int w = 0; w < kWarps; ++w) mx = max_no_nan(mx, warp_max[w]);
      block_max[kt >> p.bm_shift] = mx;
    }
  }
  __syncthreads();  // block maxima complete

  // Start of each row's threshold search (every lane of a quad holds its two rows).
  Threshold th[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_max[r] = max_no_nan(row_max[r], __shfl_xor_sync(kFullMask, row_max[r], 1));
    row_max[r] = max_no_nan(row_max[r], __shfl_xor_sync(kFullMask, row_max[r], 2));
    count[r] += __shfl_xor_sync(kFullMask, count[r], 1);
    count[r] += __shfl_xor_sync(kFullMask, count[r], 2);
    int any_bad_entry = bad[r];
    any_bad_entry |= __shfl_xor_sync(kFullMask, any_bad_entry, 1);
    any_bad_entry |= __shfl_xor_sync(kFullMask, any_bad_entry, 2);
    bad[r] = any_bad_entry != 0;
    merge_largest(cand[r], rejected[r], 1);
    merge_largest(cand[r], rejected[r], 2);
    if (row_i[r] < Lq) {
      RowCandidates<acc_t, kCandidates> rc;
      rc.reset();
#pragma unroll
      for (int c = 0; c < kCandidates; ++c) {
        rc.value[c] = cand[r][c];
        rc.count += cand[r][c] > neg_inf<acc_t>();
      }
      rc.max_rejected = rejected[r];
      th[r].start(alpha_at<acc_t>(p, sq, h, row_i[r]), row_max[r], count[r], bad[r], rc);
    }
  }

  // Threshold passes, then the output pass at the thresholds they settle on; again for the
  // rows whose finder does not accept the output pass's evaluation (rare: see RowThreshold).
  const bool any_bad = __syncthreads_or(th[0].kind == Threshold::kBad || th[1].kind == Threshold::kBad);
  double sum_p[2], minus_dF_out[2];
  for (;;) {
    // Threshold passes while a row of the tile iterates; a block is skipped when it
    // is zero at every threshold >= lo for every pending row (for a warp: its rows).
    for (;;) {
      const bool pending[2] = {!th[0].ready, !th[1].ready};
      if (!__syncthreads_or(pending[0] || pending[1])) break;
      double F[2] = {0, 0}, minus_dF[2] = {0, 0};
      for (int64_t kt = tiles.lo; kt < tiles.hi; ++kt) {
        const acc_t M = block_max[kt >> p.bm_shift];
        bool need[2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
          need[r] = pending[r] && !attention::zero_at_or_above(M - th[r].m, th[r].lo, th[r].eps);
        const bool warp_need = __any_sync(kFullMask, need[0] || need[1]);
        if (!__syncthreads_or(warp_need)) continue;
        scores(kt, warp_need);
        if (!warp_need) continue;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          acc_t f = 0, dz = 0;
          if (need[r]) {
            const acc_t t = th[r].t();
#pragma unroll
            for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
              for (int e = 2 * r; e < 2 * r + 2; ++e) {
                const EntryAtT<acc_t> en = attention::score_entry(S.v[nt][e] - th[r].m, t, th[r].eps, th[r].inv_eps);
                f += en.p;
                dz += en.p_over_z;
              }
          }
          F[r] += quad_sum(f);
          minus_dF[r] += quad_sum(dz);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (pending[r]) th[r].update(static_cast<acc_t>(F[r]), static_cast<acc_t>(-minus_dF[r]));
    }

    // Output pass, one chunk of value columns at a time (the block map, sum p and F' in the first).
    sum_p[0] = sum_p[1] = 0;
    minus_dF_out[0] = minus_dF_out[1] = 0;
    Frag<acc_t, NT> O;
    for (int c0 = 0; c0 < p.Dv; c0 += Gemm::kChunk) {
      O.zero();
      for (int64_t kt = tiles.lo; kt < tiles.hi; ++kt) {
        const acc_t M = block_max[kt >> p.bm_shift];
        bool act[2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
          act[r] = th[r].computes() && !attention::zero_at_or_above(M - th[r].m, th[r].t(), th[r].eps);
        const bool warp_act = __any_sync(kFullMask, act[0] || act[1]);
        const bool block_act = __syncthreads_or(warp_act);
        // A bad row's gradient is NaN wherever it can attend: the backward visits those blocks.
        if (c0 == 0 && tid == 0) map_row[kt] = (block_act || (any_bad && M > neg_inf<acc_t>())) ? 1 : 0;
        if (!block_act) continue;
        gemm.template load<kY1>(
            tile_of<scalar_t>(p.v, p.v_st, p.v_vec16, sq.rb, hk, sq.k0 + kt * kTile, sq.k0 + sq.geo.Lk, p.Dv),
            acc_t(1), c0);
        scores(kt, warp_act);  // its leading __syncthreads() also covers the V load
        if (warp_act) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            acc_t f = 0, dz = 0;
            const acc_t t = th[r].t();
#pragma unroll
            for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
              for (int e = 2 * r; e < 2 * r + 2; ++e) {
                EntryAtT<acc_t> en{acc_t(0), acc_t(0)};
                if (act[r]) en = attention::score_entry(S.v[nt][e] - th[r].m, t, th[r].eps, th[r].inv_eps);
                S.v[nt][e] = en.p;
                f += en.p;
                dz += en.p_over_z;
              }
            if (c0 == 0) {
              sum_p[r] += quad_sum(f);
              minus_dF_out[r] += quad_sum(dz);
            }
          }
        }
        gemm.template a_y<kY1>(O, S, 0, warp_act);
      }
      // out = O / sum p; bad rows NaN, empty rows 0.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (row_i[r] >= Lq) continue;
        acc_t o_scale;
        if (th[r].kind == Threshold::kBad) o_scale = quiet_nan<acc_t>();
        else if (th[r].kind == Threshold::kEmpty) o_scale = acc_t(0);
        else o_scale = static_cast<acc_t>(1.0 / sum_p[r]);
        store_row_chunk(static_cast<scalar_t*>(p.out) + row_index(p, sq, h, row_i[r]) * p.Dv, O, r, c0, p.Dv,
                        o_scale);
      }
    }

    bool accepted = true;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row_i[r] < Lq)
        accepted &= th[r].check_output(static_cast<acc_t>(sum_p[r]), static_cast<acc_t>(-minus_dF_out[r]));
    if (!__syncthreads_or(!accepted)) break;
  }

  // Row statistics (lane 0 of a quad writes its first row, lane 1 its second).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (fc.tq != r || row_i[r] >= Lq) continue;
    acc_t m = th[r].m, t = th[r].t(), inv_norm;
    if (th[r].kind == Threshold::kBad) {
      m = t = inv_norm = quiet_nan<acc_t>();
    } else if (th[r].kind == Threshold::kEmpty) {
      m = neg_inf<acc_t>();
      t = inv_norm = acc_t(0);
    } else {
      inv_norm = static_cast<acc_t>(1.0 / sum_p[r]);
    }
    acc_t* st = static_cast<acc_t*>(p.stats);
    st[stat_index(p, sq, h, attention::kStatMax, row_i[r])] = m;
    st[stat_index(p, sq, h, attention::kStatThreshold, row_i[r])] = t;
    st[stat_index(p, sq, h, attention::kStatInvNorm, row_i[r])] = inv_norm;
    st[stat_index(p, sq, h, attention::kStatEvaluations, row_i[r])] =
        static_cast<acc_t>(th[r].computes() ? th[r].evaluations : 0);
  }
}

#if !defined(ENTMAX_CUDA_EMULATION)
template <class Gemm>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const AttentionParams p) {
  if constexpr (runs_here<Gemm>()) forward_tile<Gemm>(p);
  else __trap();
}
#endif  // !ENTMAX_CUDA_EMULATION

}  // namespace attention_cuda
}  // namespace entmax_cuda
