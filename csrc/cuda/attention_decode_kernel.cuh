// The split-K decoding kernels (docs/attention.md, decoding): a few query rows per
// (entry, head) against a long KV cache, with the keys split across CTAs. Entmax's
// threshold is global over a row's keys, so the splits agree on it before any output is
// formed: every pass below runs on all work items, and a merge over the rows runs
// between passes (attention_decode_math.h has the plan and the merges; the CPU twin,
// cpu/attention_decode_cpu.cpp, runs the same passes and merges in the same order).
//
//   decode_pass: one CTA per work item = (entry, kv head, chunk of kDecodeRows query
//     rows of the kv head's group, split of the key tiles). kDecodeSubs threads per row;
//     each of a row's threads holds kDecodeKeysPerThread keys of each 64-key tile.
//     Pass 0: max, count, bad flag, the top kCandidates scores and the largest not kept,
//     per row and split; each row's max per key tile (for the skip tests).
//     Threshold pass: sum p and sum p/z at the row's t, per row and split.
//     Output pass: the same sums and O_s = sum p v, per row and split.
//     A key tile is loaded only if one of the CTA's rows can be nonzero in it.
//   decode_merge: one thread per row: merge 1, 2 or 3 of attention_decode_math.h over
//     the row's splits in split order; merge 3 writes the output and the statistics.
//     Rows left in the threshold phase are counted in `pending`, which the host reads.
//
// SIMT for every dtype, accumulation in acc_t (float; double for float64): a decoding
// row does too little arithmetic per key for tensor cores to matter. No torch here.
#pragma once

#include "../attention_decode_math.h"
#include "attention_kernel_common.cuh"

namespace entmax_cuda {
namespace attention_cuda {

using attention::DecodePlan;
using attention::DecodeRow;
using attention::SplitSummary;
using attention::kDecodeRows;

constexpr int kDecodeSubs = kThreads / kDecodeRows;           // threads of a row
constexpr int kDecodeKeysPerThread = kTile / kDecodeSubs;     // a thread's keys of a tile: sub + kDecodeSubs * c
constexpr int kDecodeCols = 32;                               // columns of a K, V or q chunk in shared memory
constexpr int kDecodeOutRows = kThreads / kDecodeCols;        // rows of the output a thread's column steps over
constexpr int kDecodeOutPerChunk = kDecodeRows / kDecodeOutRows;
constexpr int kDecodeMaxChunks = static_cast<int>(attention::kMaxHeadDim) / kDecodeCols;
static_assert(kDecodeSubs == 8 && kTile % kDecodeSubs == 0 && kDecodeRows % kDecodeOutRows == 0,
              "decode: 8 threads per row, rows of the output a whole number per thread");

enum DecodeMerge : int { kMergeStart = 0, kMergeThreshold = 1, kMergeOutput = 2 };

// The decode call's buffers in global memory (attention_params.h allocates them).
template <typename acc_t>
struct DecodeBuffers {
  DecodePlan plan;
  SplitSummary<acc_t>* summary;  // [row][split]
  acc_t* block_max;              // [row][key tile]
  DecodeRow<acc_t>* rows;        // [row]
  double* sums;                  // [row][split][2]
  acc_t* partial;                // [row][split][Dv]
  int* pending;                  // rows left in the threshold phase after a merge
};

// Shared memory of decode_pass, in acc_t elements: a staged K or V chunk (64 keys x 32
// columns, one column of padding: no bank conflicts) or, at the end of pass 0, the
// threads' candidate lists; the q chunk of the CTA's rows; the tile's p of each row.
template <typename acc_t>
struct DecodeSmem {
  static constexpr int kStage = kTile * (kDecodeCols + 1);
  static constexpr int kCandLists = kDecodeRows * kDecodeSubs * (attention::kCandidates + 1);
  static constexpr int kStageOrCand = kStage > kCandLists ? kStage : kCandLists;
  static constexpr int kQ = kDecodeRows * (kDecodeCols + 1);
  static constexpr int kP = kDecodeRows * (kTile + 1);
  static constexpr size_t bytes = (kStageOrCand + kQ + kP) * sizeof(acc_t);
};

template <typename T>
__device__ __forceinline__ T load_element(const void* base, const int64_t (&st)[4], int64_t b, int64_t h,
                                          int64_t row, int64_t col) {
  return static_cast<const T*>(base)[b * st[0] + h * st[1] + row * st[2] + col * st[3]];
}

// Columns [c0, c0 + kDecodeCols) of keys j0.. j0 + 63 of kv head hk (K or V) into dst:
// zero past the head dim and past the sequence's keys (`rows`: a cache's rows beyond the
// ones in use may hold anything, NaN included, and are never read).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_keys(acc_t* dst, const void* src, const int64_t (&st)[4], int64_t rb,
                                           int64_t hk, int64_t k0, int64_t j0, int64_t rows, int c0, int width) {
  for (int e = threadIdx.x; e < kTile * kDecodeCols; e += kThreads) {
    const int key = e / kDecodeCols, col = e % kDecodeCols;
    const int64_t j = j0 + key;
    dst[key * (kDecodeCols + 1) + col] =
        (j < rows && c0 + col < width) ? Scalar<scalar_t>::to_acc(load_element<scalar_t>(src, st, rb, hk, k0 + j, c0 + col))
                                       : acc_t(0);
  }
}

template <typename scalar_t>
__device__ void decode_pass(const AttentionParams& p, const DecodeBuffers<typename Scalar<scalar_t>::acc>& w,
                            int pass) {
  using acc_t = typename Scalar<scalar_t>::acc;
  using Smem = DecodeSmem<acc_t>;
  using Threshold = RowThreshold<acc_t>;
  ENTMAX_DYNAMIC_SMEM(smem_raw);
  acc_t* stage = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* qs = stage + Smem::kStageOrCand;
  acc_t* ps = qs + Smem::kQ;

  const DecodePlan& plan = w.plan;
  const DecodePlan::Item it = plan.item(blockIdx.x);
  const int tid = threadIdx.x, r = tid / kDecodeSubs, sub = tid % kDecodeSubs;
  const Sequence sq = sequence_of(p, it.b);
  const bool pass0 = pass == attention::kDecodePass0, output = pass == attention::kDecodeOutput;
  int64_t h = 0, i = 0, row = 0;
  const bool valid = plan.row_of(it, r, h, i, row);
  Threshold th;
  bool active = valid;
  if (valid && !pass0) {
    const DecodeRow<acc_t> state = w.rows[row];
    th = state.th;
    active = attention::decode_row_evaluates(state, pass);
  }
  const attention::KeyRange keys = active ? row_keys(sq, i) : attention::KeyRange{0, 0};
  const acc_t slope = active ? alibi_slope<acc_t>(p, it.b, h) : acc_t(0);
  const attention::KeyRange tiles = plan.split_tiles(it.split);
  const int64_t S = plan.splits, s = it.split;
  const int64_t hk = it.hkv;

  acc_t m = neg_inf<acc_t>(), rejected = neg_inf<acc_t>();
  long long count = 0;
  int bad = 0;
  acc_t cand[attention::kCandidates];
#pragma unroll
  for (int c = 0; c < attention::kCandidates; ++c) cand[c] = neg_inf<acc_t>();
  double F = 0, minus_dF = 0;
  acc_t o[kDecodeMaxChunks][kDecodeOutPerChunk];
#pragma unroll
  for (int ch = 0; ch < kDecodeMaxChunks; ++ch)
#pragma unroll
    for (int u = 0; u < kDecodeOutPerChunk; ++u) o[ch][u] = acc_t(0);

  for (int64_t kt = tiles.lo; kt < tiles.hi; ++kt) {
    const int64_t j0 = kt * kTile;
    bool need = active && keys.lo < j0 + kTile && keys.hi > j0;
    if (need && !pass0)
      need = !attention::zero_at_or_above(w.block_max[row * plan.nK + kt] - th.m, th.t(), th.eps);
    if (!__syncthreads_or(need)) {
      if (pass0 && valid && sub == 0) w.block_max[row * plan.nK + kt] = neg_inf<acc_t>();
      continue;
    }
    // The scores of the thread's keys: sum over column chunks of (scale q) . k.
    acc_t score[kDecodeKeysPerThread];
#pragma unroll
    for (int c = 0; c < kDecodeKeysPerThread; ++c) score[c] = acc_t(0);
    for (int c0 = 0; c0 < p.D; c0 += kDecodeCols) {
      __syncthreads();  // the last chunk's readers are done
      stage_keys<scalar_t>(stage, p.k, p.k_st, sq.rb, hk, sq.k0, j0, sq.geo.Lk, c0, p.D);
      for (int e = tid; e < kDecodeRows * kDecodeCols; e += kThreads) {
        const int rr = e / kDecodeCols, col = e % kDecodeCols;
        int64_t hr, ir, rowr;
        const bool in = plan.row_of(it, rr, hr, ir, rowr) && c0 + col < p.D;
        qs[rr * (kDecodeCols + 1) + col] =
            in ? Scalar<scalar_t>::to_acc(load_element<scalar_t>(p.q, p.q_st, sq.rb, hr, sq.q0 + ir, c0 + col)) *
                     static_cast<acc_t>(p.scale)
               : acc_t(0);
      }
      __syncthreads();
      for (int d = 0; d < kDecodeCols; ++d) {
        const acc_t qd = qs[r * (kDecodeCols + 1) + d];
#pragma unroll
        for (int c = 0; c < kDecodeKeysPerThread; ++c)
          score[c] += qd * stage[(sub + kDecodeSubs * c) * (kDecodeCols + 1) + d];
      }
    }
    // The entries.
    acc_t tile_max = neg_inf<acc_t>(), f = 0, dz = 0;
#pragma unroll
    for (int c = 0; c < kDecodeKeysPerThread; ++c) {
      const int64_t j = j0 + sub + kDecodeSubs * c;
      const bool visible = need && keys.contains(j);
      acc_t sc = score[c];
      if (p.alibi != nullptr) sc += attention::alibi_bias(slope, i, j, sq.geo.diag);
      if (pass0) {
        if (!visible) continue;
        bad |= !(sc < -neg_inf<acc_t>());  // NaN or +inf
        if (sc == neg_inf<acc_t>()) continue;
        m = max_no_nan(m, sc);
        tile_max = max_no_nan(tile_max, sc);
        ++count;
        keep_largest(cand, rejected, sc);
        continue;
      }
      acc_t pj = 0;
      if (visible) {
        const EntryAtT<acc_t> e = attention::score_entry(sc - th.m, th.t(), th.eps, th.inv_eps);
        pj = e.p;
        f += e.p;
        dz += e.p_over_z;
      }
      if (output) ps[r * (kTile + 1) + sub + kDecodeSubs * c] = pj;
    }
    if (pass0) {
#pragma unroll
      for (int x = 1; x < kDecodeSubs; x <<= 1) tile_max = max_no_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, x));
      if (valid && sub == 0) w.block_max[row * plan.nK + kt] = tile_max;
      continue;
    }
#pragma unroll
    for (int x = 1; x < kDecodeSubs; x <<= 1) {
      f += __shfl_xor_sync(kFullMask, f, x);
      dz += __shfl_xor_sync(kFullMask, dz, x);
    }
    F += f;
    minus_dF += dz;
    if (!output) continue;
    // O += P V over the tile, a column chunk of V at a time: the thread's column cc of
    // each chunk, rows r0 + kDecodeOutRows * u. Entries with p = 0 are skipped, as the CPU
    // twin skips them: a value vector outside the support (NaN or inf included) never
    // reaches the output.
    const int cc = tid % kDecodeCols, r0 = tid / kDecodeCols;
#pragma unroll
    for (int ch = 0; ch < kDecodeMaxChunks; ++ch) {
      const int c0 = ch * kDecodeCols;
      if (c0 >= p.Dv) break;
      __syncthreads();  // ps written; the last chunk's readers are done
      stage_keys<scalar_t>(stage, p.v, p.v_st, sq.rb, hk, sq.k0, j0, sq.geo.Lk, c0, p.Dv);
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kDecodeOutPerChunk; ++u) {
        const acc_t* pr = ps + (r0 + kDecodeOutRows * u) * (kTile + 1);
        acc_t acc = o[ch][u];
        for (int j = 0; j < kTile; ++j)  // a key outside the support adds nothing, whatever its value
          acc += pr[j] != acc_t(0) ? pr[j] * stage[j * (kDecodeCols + 1) + cc] : acc_t(0);
        o[ch][u] = acc;
      }
    }
  }

  if (pass0) {
    // Max, count and bad flag over the row's threads; the candidate lists through shared memory.
#pragma unroll
    for (int x = 1; x < kDecodeSubs; x <<= 1) {
      m = max_no_nan(m, __shfl_xor_sync(kFullMask, m, x));
      count += __shfl_xor_sync(kFullMask, count, x);
      bad |= __shfl_xor_sync(kFullMask, bad, x);
    }
    __syncthreads();  // the stage's last readers are done
    acc_t* list = stage + (r * kDecodeSubs + sub) * (attention::kCandidates + 1);
#pragma unroll
    for (int c = 0; c < attention::kCandidates; ++c) list[c] = cand[c];
    list[attention::kCandidates] = rejected;
    __syncthreads();
    if (valid && sub == 0) {
      RowCandidates<acc_t, attention::kCandidates> merged;
      merged.reset();
      acc_t lost = neg_inf<acc_t>();
      for (int t = 0; t < kDecodeSubs; ++t) {
        const acc_t* l = stage + (r * kDecodeSubs + t) * (attention::kCandidates + 1);
        for (int c = 0; c < attention::kCandidates; ++c)
          if (l[c] > neg_inf<acc_t>()) merged.offer(l[c]);
        lost = max_no_nan(lost, l[attention::kCandidates]);
      }
      SplitSummary<acc_t>& out = w.summary[row * S + s];
      out.max = m;
      out.rejected = max_no_nan(merged.max_rejected, lost);
      out.count = count;
      out.bad = bad;
      out.n_cand = merged.count;
      for (int c = 0; c < merged.count; ++c) out.cand[c] = merged.value[c];
    }
    return;
  }
  if (active && sub == 0) {
    w.sums[(row * S + s) * 2] = F;
    w.sums[(row * S + s) * 2 + 1] = minus_dF;
  }
  if (!output) return;
  const int cc = tid % kDecodeCols, r0 = tid / kDecodeCols;
#pragma unroll
  for (int u = 0; u < kDecodeOutPerChunk; ++u) {
    int64_t hr, ir, rowr;
    if (!plan.row_of(it, r0 + kDecodeOutRows * u, hr, ir, rowr)) continue;
    acc_t* dst = w.partial + (rowr * S + s) * p.Dv;
#pragma unroll
    for (int ch = 0; ch < kDecodeMaxChunks; ++ch)
      if (ch * kDecodeCols + cc < p.Dv) dst[ch * kDecodeCols + cc] = o[ch][u];
  }
}

// One thread per row: merge 1 (start), 2 (threshold) or 3 (output) over the row's splits.
template <typename scalar_t>
__device__ void decode_merge(const AttentionParams& p, const DecodeBuffers<typename Scalar<scalar_t>::acc>& w,
                             int which) {
  using acc_t = typename Scalar<scalar_t>::acc;
  const DecodePlan& plan = w.plan;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= plan.rows()) return;
  const int64_t S = plan.splits;
  DecodeRow<acc_t> st;
  if (which == kMergeStart) {
    const int64_t bh = row / plan.Lq, i = row % plan.Lq;
    const Sequence sq = sequence_of(p, bh / plan.Hq);
    attention::decode_merge_start(st, w.summary + row * S, S, alpha_at<acc_t>(p, sq, bh % plan.Hq, i));
  } else {
    st = w.rows[row];
    if (which == kMergeThreshold) {
      attention::decode_merge_threshold(st, w.sums + row * S * 2, S);
    } else if (st.phase == attention::kDecodeOutput) {
      attention::DecodeFinish<acc_t> fin;
      if (attention::decode_merge_output(st, w.sums + row * S * 2, S, fin)) {
        const bool computed = st.th.computes();
        scalar_t* out = static_cast<scalar_t*>(p.out) + row * p.Dv;
        for (int c = 0; c < p.Dv; ++c) {
          acc_t o = 0;
          if (computed)
            for (int64_t s = 0; s < S; ++s) o += w.partial[(row * S + s) * p.Dv + c];
          out[c] = Scalar<scalar_t>::from_acc(o * fin.o_scale);
        }
        attention::write_decode_stats(static_cast<acc_t*>(p.stats), row, plan.Lq, fin);
      }
    }
  }
  w.rows[row] = st;
  if (st.phase == attention::kDecodeThreshold) atomicAdd(w.pending, 1);
}

#if !defined(ENTMAX_CUDA_EMULATION)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    attention_decode_pass_kernel(const AttentionParams p, const DecodeBuffers<typename Scalar<scalar_t>::acc> w,
                                 int pass) {
  decode_pass<scalar_t>(p, w, pass);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    attention_decode_merge_kernel(const AttentionParams p, const DecodeBuffers<typename Scalar<scalar_t>::acc> w,
                                  int which) {
  decode_merge<scalar_t>(p, w, which);
}
#endif  // !ENTMAX_CUDA_EMULATION

}  // namespace attention_cuda
}  // namespace entmax_cuda
