// Decoding with the keys split across work items (docs/attention.md section 8): the plan
// of a launch, what a split reports, and the three merges that turn the splits' reports
// into one threshold per row. Shared by the CPU twin (cpu/attention_decode_cpu.cpp) and
// the CUDA kernels (cuda/attention_decode_kernel.cuh), so both split and merge the same
// way; only the passes over the keys are written once per device.
//
// No torch here: plain structs and functions that compile as host and device code.
#pragma once

#include "attention_math.h"

#include <cstdint>

namespace entmax_cuda {
namespace attention {

// Query rows of one work item: a chunk of the rows that share a key/value head.
constexpr int kDecodeRows = 16;
// The automatic choice gives every split at least this many key tiles, and at most
// kDecodeMaxSplits splits (the per-split buffers are linear in the splits).
constexpr int64_t kDecodeMinTilesPerSplit = 4;
constexpr int64_t kDecodeMaxSplits = 128;

// The pass argument of a work item's pass: pass 0, or the phase of the rows a
// threshold or output pass evaluates.
constexpr int kDecodePass0 = -1;

// Where a row stands between the passes.
enum DecodePhase : int {
  kDecodeThreshold = 0,  // its threshold search needs another threshold pass
  kDecodeOutput = 1,     // the next evaluation is its output pass (or it has nothing to compute)
  kDecodeDone = 2,       // its output is written
};

// A launch: B entries, Hq query heads over Hkv key/value heads, Lq query rows per entry
// and head (aligned bottom-right to each entry's keys), Lk cache rows (nK key tiles).
// Rows are numbered as (B, Hq, Lq) tensors are laid out: (b * Hq + h) * Lq + i. The rows
// of key/value head hkv are those of its group's query heads (GQA), local index e = g * Lq
// + i for head h = hkv * group + g; a work item is kDecodeRows of them (one chunk) against
// the key tiles of one split. Every split but the last has tiles_per_split tiles.
struct DecodePlan {
  int64_t B, Hq, Hkv, group, Lq, Lk, nK, head_rows, chunks, splits, tiles_per_split;

  ENTMAX_HD DecodePlan(int64_t B_, int64_t Hq_, int64_t Hkv_, int64_t Lq_, int64_t Lk_, int64_t requested_splits)
      : B(B_), Hq(Hq_), Hkv(Hkv_), group(Hq_ / Hkv_), Lq(Lq_), Lk(Lk_), nK(num_tiles(Lk_, kBlockK)),
        head_rows(group * Lq_), chunks(num_tiles(group * Lq_, kDecodeRows)) {
    const int64_t wanted = requested_splits < 1 ? 1 : requested_splits;
    tiles_per_split = nK == 0 ? 1 : num_tiles(nK, wanted < nK ? wanted : nK);
    splits = nK == 0 ? 1 : num_tiles(nK, tiles_per_split);  // no split without tiles
  }

  ENTMAX_HD int64_t items() const { return B * Hkv * chunks * splits; }
  ENTMAX_HD int64_t rows() const { return B * Hq * Lq; }

  struct Item {
    int64_t b, hkv, chunk, split;
  };
  ENTMAX_HD Item item(int64_t x) const {
    Item it;
    it.split = x % splits;
    x /= splits;
    it.chunk = x % chunks;
    x /= chunks;
    it.hkv = x % Hkv;
    it.b = x / Hkv;
    return it;
  }

  ENTMAX_HD KeyRange split_tiles(int64_t split) const {
    const int64_t lo = split * tiles_per_split, hi = lo + tiles_per_split;
    return KeyRange{lo, hi < nK ? hi : nK};
  }

  // Row r (< kDecodeRows) of the item: its head h, query i and global row index; false
  // past the head's rows.
  ENTMAX_HD bool row_of(const Item& it, int r, int64_t& h, int64_t& i, int64_t& row) const {
    const int64_t e = it.chunk * kDecodeRows + r;
    if (e >= head_rows) return false;
    h = it.hkv * group + e / Lq;
    i = e % Lq;
    row = (it.b * Hq + h) * Lq + i;
    return true;
  }
};

// Splits for `base_items` work items (B * Hkv * chunks) to reach `target_items`, each
// split keeping at least kDecodeMinTilesPerSplit of the nK key tiles.
ENTMAX_HD int64_t decode_splits_for(int64_t base_items, int64_t nK, int64_t target_items) {
  if (base_items <= 0 || nK <= 0) return 1;
  int64_t s = num_tiles(target_items, base_items);
  const int64_t by_tiles = nK / kDecodeMinTilesPerSplit;
  if (s > by_tiles) s = by_tiles;
  if (s > kDecodeMaxSplits) s = kDecodeMaxSplits;
  return s < 1 ? 1 : s;
}

// Pass 0 of one row over one split's keys: its max, count of visible keys, whether a
// score was NaN or +inf, and the kCandidates largest scores with the largest not kept.
template <typename T>
struct SplitSummary {
  T max;
  T rejected;
  int64_t count;
  int32_t bad;
  int32_t n_cand;
  T cand[kCandidates];
};

// A row between the passes: its threshold search and its phase.
template <typename T>
struct DecodeRow {
  RowThreshold<T> th;
  int phase;
};

// Merge 1: the splits' summaries (in split order) to the row's start. The union's
// kCandidates largest scores (sorted, largest first, so that the subset threshold is a
// function of the values alone) bound the threshold from below; when the largest score
// left out is zero there, the row is settled without a threshold pass.
template <typename T>
ENTMAX_HD void decode_merge_start(DecodeRow<T>& row, const SplitSummary<T>* summary, int64_t splits, T alpha) {
  T m = neg_inf<T>(), rejected = neg_inf<T>();
  int64_t count = 0;
  bool bad = false;
  RowCandidates<T, kCandidates> cand;
  cand.reset();
  for (int64_t s = 0; s < splits; ++s) {
    const SplitSummary<T>& x = summary[s];
    m = max_(m, x.max);
    rejected = max_(rejected, x.rejected);
    count += x.count;
    bad = bad || x.bad != 0;
    for (int c = 0; c < x.n_cand; ++c) cand.offer(x.cand[c]);
  }
  cand.max_rejected = max_(cand.max_rejected, rejected);
  for (int a = 1; a < cand.count; ++a)  // insertion sort, largest first
    for (int c = a; c > 0 && cand.value[c] > cand.value[c - 1]; --c) {
      const T v = cand.value[c];
      cand.value[c] = cand.value[c - 1];
      cand.value[c - 1] = v;
    }
  row.th.start(alpha, m, count, bad, cand);
  row.phase = row.th.kind == RowThreshold<T>::kIterate && !row.th.ready ? kDecodeThreshold : kDecodeOutput;
}

// Merge 2: a threshold pass's per-split sums (F_s, -F'_s pairs, split order) to the next
// threshold. Only rows in the threshold phase take it.
template <typename T>
ENTMAX_HD void decode_merge_threshold(DecodeRow<T>& row, const double* sums, int64_t splits) {
  if (row.phase != kDecodeThreshold) return;
  double F = 0, minus_dF = 0;
  for (int64_t s = 0; s < splits; ++s) {
    F += sums[2 * s];
    minus_dF += sums[2 * s + 1];
  }
  row.th.update(static_cast<T>(F), static_cast<T>(-minus_dF));
  if (row.th.ready) row.phase = kDecodeOutput;
}

// What a row's output pass ends with: the scale of its output sum and its statistics.
template <typename T>
struct DecodeFinish {
  T o_scale, m, t, inv_norm, evaluations;
};

// Merge 3: the output pass's per-split sums (sum p, sum p/z in split order) go to the
// finder's check. Accepted (or nothing to check): the row is done, and the result says
// how to scale its output sum (sum over the splits of O_s, in split order) and what its
// statistics are, as the single-pass forward's. Rejected: the row is back in the
// threshold phase, and its output pass will be repeated.
template <typename T>
ENTMAX_HD bool decode_merge_output(DecodeRow<T>& row, const double* sums, int64_t splits, DecodeFinish<T>& fin) {
  double P = 0, minus_dF = 0;
  for (int64_t s = 0; s < splits; ++s) {
    P += sums[2 * s];
    minus_dF += sums[2 * s + 1];
  }
  RowThreshold<T>& th = row.th;
  if (!th.check_output(static_cast<T>(P), static_cast<T>(-minus_dF))) {
    row.phase = kDecodeThreshold;
    return false;
  }
  row.phase = kDecodeDone;
  fin.m = th.m;
  fin.t = th.t();
  if (th.kind == RowThreshold<T>::kBad) {
    fin.m = fin.t = fin.inv_norm = fin.o_scale = quiet_nan<T>();
  } else if (th.kind == RowThreshold<T>::kEmpty) {
    fin.m = neg_inf<T>();
    fin.t = fin.inv_norm = fin.o_scale = T(0);
  } else {
    fin.inv_norm = fin.o_scale = static_cast<T>(1.0 / P);
  }
  fin.evaluations = static_cast<T>(th.computes() ? th.evaluations : 0);
  return true;
}

// Whether a row takes part in a pass of the given phase (a row with nothing to compute
// takes none: its output is NaN or zero). A pass evaluates its rows at th.t(), and skips
// a key tile for a row whose pass-0 maximum there is zero at th.t() (zero_at_or_above:
// every entry of the tile is then exactly 0).
template <typename T>
ENTMAX_HD bool decode_row_evaluates(const DecodeRow<T>& row, int phase) {
  return row.phase == phase && row.th.computes();
}

// Row `row`'s statistics into stats (B, Hq, kNumStats, Lq).
template <typename T>
ENTMAX_HD void write_decode_stats(T* stats, int64_t row, int64_t Lq, const DecodeFinish<T>& fin) {
  T* st = stats + (row / Lq) * kNumStats * Lq + row % Lq;
  st[kStatMax * Lq] = fin.m;
  st[kStatThreshold * Lq] = fin.t;
  st[kStatInvNorm * Lq] = fin.inv_norm;
  st[kStatEvaluations * Lq] = fin.evaluations;
}

// The passes of one call, for a runner with pass(p) (every work item's pass p: pass 0 or
// the phase it evaluates) and merge_start(), merge_threshold(), merge_output() (over every
// row; each returns how many rows are left in the threshold phase). Threshold passes run
// while a row needs one; then the output pass; rows whose output evaluation the finder
// rejects go back to threshold passes, and the output pass repeats for them. Returns
// false if the loop outran its bound: every pass evaluates at least one of the `rows` rows,
// and a row's finder ends within kMaxRootIterations evaluations (its output check then
// accepts at once), so no call needs more than rows * (kMaxRootIterations + 2) passes.
template <class Runner>
bool run_decode_passes(Runner& run, int64_t rows) {
  run.pass(kDecodePass0);
  int64_t pending = run.merge_start();
  const int64_t bound = rows * (math::kMaxRootIterations + 2) + 2;
  for (int64_t round = 0; round <= bound; ++round) {
    if (pending > 0) {
      run.pass(kDecodeThreshold);
      pending = run.merge_threshold();
      continue;
    }
    run.pass(kDecodeOutput);
    pending = run.merge_output();
    if (pending == 0) return true;
  }
  return false;
}

}  // namespace attention
}  // namespace entmax_cuda
