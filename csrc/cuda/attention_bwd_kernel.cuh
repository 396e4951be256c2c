// The backward kernels of the fused alpha-entmax attention (attention_kernel_common.cuh
// says what each kernel does): the row sweep (q_i, the alpha-gradient, dQ) and the key
// sweep (dK, dV), the same stages as the CPU kernel's backward_query_tile and
// backward_key_tile.
#pragma once

#include "attention_kernel_common.cuh"

namespace entmax_cuda {
namespace attention_cuda {

// ------------------------------------------------------------------ backward

// A row's backward constants from the forward's statistics; rows past the sequence's end are empty.
template <typename acc_t>
__device__ __forceinline__ void load_backward_row(const AttentionParams& p, const Sequence& sq, int64_t h, int64_t i,
                                                  BackwardRow<acc_t>& row, bool& bad) {
  row = BackwardRow<acc_t>{};
  row.empty = true;
  bad = false;
  if (i >= sq.geo.Lq) return;
  const acc_t* st = static_cast<const acc_t*>(p.stats);
  const acc_t m = st[stat_index(p, sq, h, attention::kStatMax, i)];
  const acc_t t = st[stat_index(p, sq, h, attention::kStatThreshold, i)];
  const acc_t n = st[stat_index(p, sq, h, attention::kStatInvNorm, i)];
  row.load(alpha_at<acc_t>(p, sq, h, i), m, t, n);
  bad = (m != m) || (t != t) || (n != n) || !(row.eps >= acc_t(0));
}

// p_hat and g of one entry (the CPU's backward_block): a bad row is NaN wherever
// it attends, an empty row 0.
template <typename acc_t>
__device__ __forceinline__ BackwardEntry<acc_t> backward_entry(const BackwardRow<acc_t>& row, bool bad, acc_t s) {
  if (bad) {
    const acc_t x = s > neg_inf<acc_t>() ? quiet_nan<acc_t>() : acc_t(0);
    return BackwardEntry<acc_t>{x, x};
  }
  if (row.empty) return BackwardEntry<acc_t>{acc_t(0), acc_t(0)};
  return row.entry(s - row.m);
}

template <class Gemm>
__device__ __forceinline__ void backward_rows_tile(const AttentionParams& p) {
  using acc_t = typename Gemm::acc_t;
  using scalar_t = typename Gemm::scalar;
  constexpr int NT = Gemm::kChunk / 8;
  ENTMAX_DYNAMIC_SMEM(smem);
  const RowsSmem<Gemm> layout(p.D, p.Dv);
  Gemm gemm(smem, layout.dims);
  const FragCoord fc;

  const QueryTile tile = query_tile_of(p, blockIdx.x);
  const int64_t b = tile.b, h = tile.h, qt = tile.qt, hk = h / p.group;
  const Sequence sq = sequence_of(p, b);
  const int64_t i0 = qt * kTile, Lq = sq.geo.Lq, k0 = sq.k0, k_end = sq.k0 + sq.geo.Lk;
  if (i0 >= Lq) return;  // the whole CTA: a tile past this sequence's queries
  const attention::KeyRange tiles = sq.geo.key_tiles_of_query_tile(qt);
  const uint8_t* map_row = p.block_map + ((b * p.Hq + h) * p.nQ + qt) * p.nK;

  int64_t row_i[2], mask_offset[2];
  attention::KeyRange keys[2];
  BackwardRow<acc_t> row[2];
  bool bad[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_i[r] = i0 + fc.row(r);
    keys[r] = row_keys(sq, row_i[r]);
    mask_offset[r] = mask_row_offset(p, b, h, row_i[r]);
    load_backward_row(p, sq, h, row_i[r], row[r], bad[r]);
  }
  const acc_t slope = alibi_slope<acc_t>(p, b, h);
  gemm.template load<kX0>(tile_of<scalar_t>(p.q, p.q_st, p.q_vec16, sq.rb, h, sq.q0 + i0, sq.q0 + Lq, p.D),
                          acc_t(p.scale));
  gemm.template load<kX1>(
      tile_of<scalar_t>(p.grad_out, p.do_st, p.do_vec16, sq.rb, h, sq.q0 + i0, sq.q0 + Lq, p.Dv), acc_t(1));
  Frag<acc_t, kTileNt> S, dP;

  // S (masked) and dP = dO V^T of an active block.
  auto block = [&](int64_t kt) {
    __syncthreads();
    gemm.template load<kY0>(tile_of<scalar_t>(p.k, p.k_st, p.k_vec16, sq.rb, hk, k0 + kt * kTile, k_end, p.D),
                            acc_t(1));
    gemm.template load<kY1>(tile_of<scalar_t>(p.v, p.v_st, p.v_vec16, sq.rb, hk, k0 + kt * kTile, k_end, p.Dv),
                            acc_t(1));
    __syncthreads();
    gemm.template xy_t<kX0, kY0>(S, true);
    gemm.template xy_t<kX1, kY1>(dP, true);
    const int64_t j0 = kt * kTile;
    const BlockCols bc[2] = {block_cols(keys[0], j0), block_cols(keys[1], j0)};
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        S.v[nt][e] = masked(p, S.v[nt][e], bc[e >> 1], mask_offset[e >> 1], j0, fc.col(nt, e), row_i[e >> 1], slope,
                            sq.geo.diag);
  };

  // Sweep 1: per row G = sum g, sum g dP (and the alpha-gradient's sums): q_i, d alpha_i.
  BackwardSums<double> sums[2];
  sums[0].zero();
  sums[1].zero();
  for (int64_t kt = tiles.lo; kt < tiles.hi; ++kt) {
    if (!map_row[kt]) continue;
    block(kt);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      BackwardSums<acc_t> part;
      part.zero();
      if (!bad[r] && !row[r].empty) {
#pragma unroll
        for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            const BackwardEntry<acc_t> en = row[r].entry(S.v[nt][e] - row[r].m);
            if (p.alpha_grad) {
              math::accumulate_backward_entry(en.p_hat, dP.v[nt][e], row[r].eps, part);
            } else {
              part.g += en.g;
              part.g_dy += en.g * dP.v[nt][e];
            }
          }
      }
      part.g = quad_sum(part.g);
      part.g_dy = quad_sum(part.g_dy);
      if (p.alpha_grad) {
        part.g_c = quad_sum(part.g_c);
        part.g_dy_c = quad_sum(part.g_dy_c);
      }
      sums[r] = sums[r] + math::widen(part);
    }
  }
  acc_t q_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    q_row[r] = bad[r] ? quiet_nan<acc_t>() : static_cast<acc_t>(math::backward_q(sums[r].g, sums[r].g_dy));
    if (fc.tq != r || row_i[r] >= Lq) continue;
    const int64_t at = row_index(p, sq, h, row_i[r]);
    static_cast<acc_t*>(p.q_rows)[at] = q_row[r];
    const acc_t da = p.alpha_grad ? static_cast<acc_t>(math::alpha_gradient(sums[r]))
                                  : acc_t(0);
    static_cast<acc_t*>(p.grad_alpha)[at] = bad[r] ? quiet_nan<acc_t>() : da;
  }

  // Sweep 2: dQ = scale * sum dS K, dS = g (dP - q_i), one chunk of columns at a time.
  Frag<acc_t, NT> dQ;
  for (int c0 = 0; c0 < p.D; c0 += Gemm::kChunk) {
    dQ.zero();
    for (int64_t kt = tiles.lo; kt < tiles.hi; ++kt) {
      if (!map_row[kt]) continue;
      block(kt);
#pragma unroll
      for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const acc_t g = backward_entry(row[r], bad[r], S.v[nt][e]).g;
          S.v[nt][e] = g * (dP.v[nt][e] - q_row[r]);
        }
      gemm.template a_y<kY0>(dQ, S, c0, true, /*scale_rows=*/true);  // dS: unbounded for alpha > 2
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row_i[r] >= Lq) continue;
      const acc_t scale = bad[r] ? quiet_nan<acc_t>() : acc_t(p.scale);
      store_row_chunk(static_cast<scalar_t*>(p.grad_q) + row_index(p, sq, h, row_i[r]) * p.D, dQ, r, c0, p.D, scale);
    }
  }
}

template <class Gemm>
__device__ __forceinline__ void backward_keys_tile(const AttentionParams& p) {
  using acc_t = typename Gemm::acc_t;
  using scalar_t = typename Gemm::scalar;
  constexpr int NT = Gemm::kChunk / 8;
  ENTMAX_DYNAMIC_SMEM(smem);
  const KeysSmem<Gemm> layout(p.D, p.Dv);
  Gemm gemm(smem, layout.dims);
  QueryColumns<acc_t>& cols = *reinterpret_cast<QueryColumns<acc_t>*>(smem + layout.columns);
  const FragCoord fc;
  const int tid = threadIdx.x;

  // Job: one column chunk of dV (jobs [0, chunks_v)) or of dK; key tiles fastest.
  const int64_t kt = blockIdx.x % p.nK;
  const int64_t rest = blockIdx.x / p.nK;
  const int64_t b = (rest % (p.B * p.Hkv)) / p.Hkv, hk = rest % p.Hkv;
  const int job = static_cast<int>(rest / (p.B * p.Hkv));
  const bool is_dk = job >= p.chunks_v;
  const int c0 = (is_dk ? job - p.chunks_v : job) * Gemm::kChunk;
  const int64_t j0 = kt * kTile;
  const Sequence sq = sequence_of(p, b);
  const int64_t Lq = sq.geo.Lq, k_end = sq.k0 + sq.geo.Lk;
  // Key rows this CTA writes: the sequence's own (packed), or the whole tensor's, the
  // keys past the used ones getting zero (no query sees them).
  const int64_t store_rows = p.packed ? sq.geo.Lk : p.Lk;
  if (j0 >= store_rows) return;  // the whole CTA: a tile past this sequence's keys

  gemm.template load<kX0>(tile_of<scalar_t>(p.k, p.k_st, p.k_vec16, sq.rb, hk, sq.k0 + j0, k_end, p.D), acc_t(1));
  if (is_dk)
    gemm.template load<kX1>(tile_of<scalar_t>(p.v, p.v_st, p.v_vec16, sq.rb, hk, sq.k0 + j0, k_end, p.Dv), acc_t(1));
  Frag<acc_t, kTileNt> S, dP;
  Frag<acc_t, NT> acc;
  acc.zero();

  const attention::KeyRange q_tiles = sq.geo.query_tiles_of_key_tile(kt);
  for (int64_t gi = 0; gi < p.group; ++gi) {
    const int64_t h = hk * p.group + gi;
    const acc_t slope = alibi_slope<acc_t>(p, b, h);
    for (int64_t qt = q_tiles.lo; qt < q_tiles.hi; ++qt) {
      if (!sq.geo.key_tiles_of_query_tile(qt).contains(kt) || !p.block_map[((b * p.Hq + h) * p.nQ + qt) * p.nK + kt])
        continue;
      const int64_t i0 = qt * kTile;
      __syncthreads();  // the previous query tile's columns and slots are read
      if (tid < kTile) {
        const int64_t i = i0 + tid;
        bool bad;
        load_backward_row(p, sq, h, i, cols.row[tid], bad);
        cols.bad[tid] = bad;
        cols.q[tid] = i < Lq ? static_cast<const acc_t*>(p.q_rows)[row_index(p, sq, h, i)] : acc_t(0);
        cols.keys[tid] = row_keys(sq, i);
        cols.mask_offset[tid] = mask_row_offset(p, b, h, i);
      }
      gemm.template load<kY0>(tile_of<scalar_t>(p.q, p.q_st, p.q_vec16, sq.rb, h, sq.q0 + i0, sq.q0 + Lq, p.D),
                              acc_t(p.scale));
      gemm.template load<kY1>(
          tile_of<scalar_t>(p.grad_out, p.do_st, p.do_vec16, sq.rb, h, sq.q0 + i0, sq.q0 + Lq, p.Dv), acc_t(1));
      __syncthreads();
      // Transposed tiles: rows are this CTA's keys, columns the query tile's queries.
      gemm.template xy_t<kX0, kY0>(S, true);
      if (is_dk) gemm.template xy_t<kX1, kY1>(dP, true);
#pragma unroll
      for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = fc.col(nt, e), key = fc.row(e >> 1);
          const acc_t s = masked(p, S.v[nt][e], block_cols(cols.keys[c], j0), cols.mask_offset[c], j0, key, i0 + c,
                                 slope, sq.geo.diag);
          const BackwardEntry<acc_t> en = backward_entry(cols.row[c], cols.bad[c] != 0, s);
          S.v[nt][e] = is_dk ? en.g * (dP.v[nt][e] - cols.q[c]) : en.p_hat;
        }
      // dV += P^T dO, dK += dS^T (scale Q)
      if (is_dk) gemm.template a_y<kY0>(acc, S, c0, true, /*scale_rows=*/true);  // dS^T: unbounded for alpha > 2
      else gemm.template a_y<kY1>(acc, S, c0, true);
    }
  }

  const int width = is_dk ? p.D : p.Dv;
  scalar_t* dst = static_cast<scalar_t*>(is_dk ? p.grad_k : p.grad_v);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = j0 + fc.row(r);
    if (j < store_rows)
      store_row_chunk(dst + ((sq.rb * p.Hkv + hk) * p.rows_k + sq.k0 + j) * width, acc, r, c0, width, acc_t(1));
  }
}

#if !defined(ENTMAX_CUDA_EMULATION)
template <class Gemm>
__global__ void __launch_bounds__(kThreads) attention_backward_rows_kernel(const AttentionParams p) {
  if constexpr (runs_here<Gemm>()) backward_rows_tile<Gemm>(p);
  else __trap();
}

template <class Gemm>
__global__ void __launch_bounds__(kThreads) attention_backward_keys_kernel(const AttentionParams p) {
  if constexpr (runs_here<Gemm>()) backward_keys_tile<Gemm>(p);
  else __trap();
}
#endif  // !ENTMAX_CUDA_EMULATION

}  // namespace attention_cuda
}  // namespace entmax_cuda
