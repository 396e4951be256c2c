// The CPU attention kernel's view of one call (attention_cpu.cpp): strided tensors, the
// Problem and its sequences (Seq: where a sequence's rows and keys lie, which keys each row
// sees), the score rules (mask_scores: visible keys, ALiBi, masks) and the converted key tiles.
#pragma once

#include "../attention_ops.h"
#include "attention_cpu_tiles.h"

#include <torch/csrc/stable/ops.h>

#include <initializer_list>

namespace entmax_cuda {
namespace {

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

// One sequence b of the call: its query rows are rows q0 + i (i < Lq) of batch entry
// rb of the row tensors, its keys rows k0 + j (j < Lk) of batch entry rb of the key
// tensors (padded batch: rb = b, q0 = k0 = 0; packed: rb = 0, offsets from cu_seqlens);
// geo says which of its keys each of its rows sees. Rows, keys and tiles below are
// local to the sequence; no tile mixes two sequences.
struct Seq {
  int64_t b, rb, q0, Lq, k0, Lk, nQ, nK;  // nQ, nK: its query and key tiles
  RowGeometry geo;
};

// Everything a tile needs to know about one attention call.
template <typename scalar_t, typename acc_t>
struct Problem {
  int64_t B, Hq, Hkv, group, Lq, Lk, D, Dv, nQ, nK, causal, left, right;  // Lq, Lk, nQ, nK: the longest sequence's
  int64_t rows_b, rows_q, rows_k;  // the row tensors' (rows_b, Hq, rows_q, .) and key tensors' (rows_b, Hkv, rows_k, .)
  int64_t Dp, Dvp;  // head dims padded to whole vectors
  acc_t scale;
  View4<scalar_t> q, k, v;
  const acc_t* alpha;
  int64_t as0, as1, as2;
  int mask_kind;
  View4<bool> bool_mask;
  View4<acc_t> add_mask;
  const acc_t* alibi = nullptr;  // slopes (B, Hq), or none
  int64_t al0 = 0, al1 = 0;
  const int32_t* cu_q = nullptr;  // packed sequences: offsets (B + 1) of their rows and keys
  const int32_t* cu_k = nullptr;
  const int32_t* used_k = nullptr;  // padded batch: keys used per entry (B), or none (all Lk)

  Seq seq(int64_t b) const {
    const SequenceSpan sp = sequence_span(b, cu_q, cu_k, used_k, Lq, Lk);
    return Seq{b, sp.rb, sp.q0, sp.Lq, sp.k0, sp.Lk, num_tiles(sp.Lq, kBlockQ), num_tiles(sp.Lk, kBlockK),
               RowGeometry(sp.Lq, sp.Lk, causal, left, right)};
  }
  acc_t alpha_at(const Seq& sq, int64_t h, int64_t i) const {
    return alpha[sq.rb * as0 + h * as1 + (sq.q0 + i) * as2];
  }
  acc_t slope(const Seq& sq, int64_t h) const { return alibi[sq.b * al0 + h * al1]; }
  int64_t key_cols(const Seq& sq, int64_t kt) const { return key_tile_cols<acc_t>(sq.Lk, kt); }
  int64_t map_index(const Seq& sq, int64_t h, int64_t qt, int64_t kt) const {
    return ((sq.b * Hq + h) * nQ + qt) * nK + kt;
  }
  // Row i of head h in the row tensors (out, dq, alpha-like (rows_b, Hq, rows_q)).
  int64_t row_index(const Seq& sq, int64_t h, int64_t i) const { return (sq.rb * Hq + h) * rows_q + sq.q0 + i; }
  int64_t stat_index(const Seq& sq, int64_t h, int64_t stat, int64_t i) const {
    return ((sq.rb * Hq + h) * kNumStats + stat) * rows_q + sq.q0 + i;
  }
  // Key j of key/value head hk in the key tensors (dk, dv).
  int64_t key_index(const Seq& sq, int64_t hk, int64_t j) const { return (sq.rb * Hkv + hk) * rows_k + sq.k0 + j; }
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

// Masks the first n columns (keys j0 + c) of a score tile S[r][c] of sequence sq (rows
// given by their local query index rows[r]): keys outside the row's visible range
// (causal limit, window, past Lk) -> -inf; inside it, the ALiBi bias added, then
// bool mask False -> -inf or the additive mask added.
template <typename scalar_t, typename acc_t>
void mask_scores(acc_t* S, const int64_t* rows, int64_t n_rows, int64_t n, const Seq& sq, int64_t h, int64_t j0,
                 const Problem<scalar_t, acc_t>& P) {
  const acc_t ninf = math::neg_inf<acc_t>();
  const acc_t slope = P.alibi != nullptr ? P.slope(sq, h) : acc_t(0);
  for (int64_t r = 0; r < n_rows; ++r) {
    acc_t* s = S + r * kBlockK;
    const int64_t i = rows[r];
    const KeyRange keys = sq.geo.keys_of_row(i);
    const int64_t lo = std::clamp<int64_t>(keys.lo - j0, 0, n), hi = std::clamp<int64_t>(keys.hi - j0, lo, n);
    for (int64_t c = 0; c < lo; ++c) s[c] = ninf;
    for (int64_t c = hi; c < n; ++c) s[c] = ninf;
    if (P.alibi != nullptr)
      for (int64_t c = lo; c < hi; ++c) s[c] += alibi_bias<acc_t>(slope, i, j0 + c, sq.geo.diag);
    if (P.mask_kind == kBoolMask) {
      const bool* m = P.bool_mask.row(sq.b, h, i) + j0 * P.bool_mask.s3;
      const int64_t st = P.bool_mask.s3;
      for (int64_t c = lo; c < hi; ++c)
        if (!m[c * st]) s[c] = ninf;
    } else if (P.mask_kind == kAdditiveMask) {
      const acc_t* m = P.add_mask.row(sq.b, h, i) + j0 * P.add_mask.s3;
      const int64_t st = P.add_mask.s3;
      for (int64_t c = lo; c < hi; ++c) s[c] += m[c * st];
    }
  }
}

// Work items in an order that spreads causal work evenly over torch's contiguous
// chunks: query (or key) tiles alternate from both ends.
inline int64_t zigzag(int64_t x, int64_t n) { return (x % 2 == 0) ? x / 2 : n - 1 - x / 2; }

// Key and value tiles converted to acc_t once per call, in the layouts the tile
// matmuls read: keys as columns [D][Bk], keys as rows [Bk][Dp], values as columns
// [Dv][Bk], values as rows [Bk][Dvp], Bk = key_tile_cols (the last tile of a
// sequence can be narrower); padding keys past a sequence's Lk are zero. A converted
// copy of k and v laid out per sequence (linear in the keys the sequences use, not in
// n_seqs x max_seqlen_k): every pass over the key tiles reads them without converting
// or transposing again.
enum TileLayout { kKeysT = 0, kKeys = 1, kValuesT = 2, kValues = 3, kNumLayouts = 4 };

template <typename acc_t>
struct KeyTiles {
  Tensor storage;
  const acc_t* base = nullptr;
  int64_t per_key = 0;                // elements a key takes over the layouts held
  int64_t offset[kNumLayouts] = {0, 0, 0, 0};  // per key: the layouts held before this one
  std::vector<int64_t> keys;   // per sequence: the padded keys of one head, sum of its tiles' widths
  std::vector<int64_t> start;  // per sequence: its first key (Hkv heads of `keys` each, one after the other)
  // Tile kt of head (sq, hk) starts at its first key, kt * kBlockK (every tile before
  // it is kBlockK wide), and holds its layouts one after the other.
  acc_t* tile(TileLayout layout, const Seq& sq, int64_t hk, int64_t kt) const {
    return const_cast<acc_t*>(base) + (start[sq.b] + hk * keys[sq.b] + kt * kBlockK) * per_key +
           key_tile_cols<acc_t>(sq.Lk, kt) * offset[layout];
  }
  const acc_t* get(TileLayout layout, const Seq& sq, int64_t hk, int64_t kt) const {
    return tile(layout, sq, hk, kt);
  }
};

template <typename scalar_t, typename acc_t>
KeyTiles<acc_t> prepare_key_tiles(const Problem<scalar_t, acc_t>& P, const Tensor& acc_like,
                                  std::initializer_list<TileLayout> layouts) {
  KeyTiles<acc_t> tiles;
  const int64_t width[kNumLayouts] = {P.D, P.Dp, P.Dv, P.Dvp};
  bool want[kNumLayouts] = {false, false, false, false};
  for (TileLayout l : layouts) want[l] = true;
  for (int l = 0; l < kNumLayouts; ++l) {
    tiles.offset[l] = tiles.per_key;
    if (want[l]) tiles.per_key += width[l];
  }
  // Per sequence: its padded keys, its first key, and its first tile (work item).
  tiles.keys.resize(P.B);
  tiles.start.resize(P.B);
  std::vector<int64_t> first_tile(P.B + 1, 0);
  int64_t total_keys = 0;
  for (int64_t b = 0; b < P.B; ++b) {
    const Seq sq = P.seq(b);
    tiles.keys[b] = sq.nK == 0 ? 0 : (sq.nK - 1) * kBlockK + P.key_cols(sq, sq.nK - 1);
    tiles.start[b] = total_keys;
    total_keys += P.Hkv * tiles.keys[b];
    first_tile[b + 1] = first_tile[b] + P.Hkv * sq.nK;
  }
  const int64_t n_tiles = first_tile[P.B];
  tiles.storage = torch::stable::new_empty(acc_like, {std::max<int64_t>(total_keys * tiles.per_key, 1)});
  tiles.base = tiles.storage.template mutable_data_ptr<acc_t>();
  torch::stable::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = std::upper_bound(first_tile.begin(), first_tile.end(), tile) - first_tile.begin() - 1;
      const Seq sq = P.seq(b);
      const int64_t item = tile - first_tile[b], hk = item / sq.nK, kt = item % sq.nK;
      const int64_t j0 = kt * kBlockK, keys = std::min<int64_t>(kBlockK, sq.Lk - j0), cols = P.key_cols(sq, kt);
      const scalar_t* k = P.k.row(sq.rb, hk, sq.k0 + j0);
      const scalar_t* v = P.v.row(sq.rb, hk, sq.k0 + j0);
      if (want[kKeysT]) load_transposed(tiles.tile(kKeysT, sq, hk, kt), cols, k, P.k.s2, P.k.s3, keys, P.D);
      if (want[kKeys])
        load_rows(tiles.tile(kKeys, sq, hk, kt), P.Dp, cols, k, P.k.s2, P.k.s3, keys, P.D, acc_t(1));
      if (want[kValuesT]) load_transposed(tiles.tile(kValuesT, sq, hk, kt), cols, v, P.v.s2, P.v.s3, keys, P.Dv);
      if (want[kValues])
        load_rows(tiles.tile(kValues, sq, hk, kt), P.Dvp, cols, v, P.v.s2, P.v.s3, keys, P.Dv, acc_t(1));
    }
  });
  return tiles;
}

// ------------------------------------------------------------------ the op's arguments as a Problem

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> make_problem(const Shape& s, const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& alpha, const std::optional<Tensor>& mask, int64_t causal,
                                      double scale, const Geometry& g) {
  Problem<scalar_t, acc_t> P;
  P.B = s.B; P.Hq = s.Hq; P.Hkv = s.Hkv; P.group = s.Hq / s.Hkv;
  P.Lq = s.Lq; P.Lk = s.Lk; P.D = s.D; P.Dv = s.Dv;
  P.rows_b = s.rows_b; P.rows_q = s.rows_q; P.rows_k = s.rows_k;
  P.nQ = num_tiles(s.Lq, kBlockQ);
  P.nK = num_tiles(s.Lk, kBlockK);
  P.causal = causal;
  P.left = g.left;
  P.right = g.right;
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
  if (g.alibi.has_value()) {
    P.alibi = g.alibi->const_data_ptr<acc_t>();
    P.al0 = g.alibi->stride(0);
    P.al1 = g.alibi->stride(1);
  }
  if (g.packed()) {
    P.cu_q = g.cu_q->const_data_ptr<int32_t>();
    P.cu_k = g.cu_k->const_data_ptr<int32_t>();
  } else if (g.used_k.has_value()) {
    P.used_k = g.used_k->const_data_ptr<int32_t>();
  }
  return P;
}

Geometry make_geometry(std::optional<Tensor> alibi_slopes, int64_t window_left, int64_t window_right,
                       std::optional<Tensor> cu_seqlens_q, std::optional<Tensor> cu_seqlens_k,
                       std::optional<Tensor> seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  Geometry g;
  g.alibi = std::move(alibi_slopes);
  g.cu_q = std::move(cu_seqlens_q);
  g.cu_k = std::move(cu_seqlens_k);
  g.used_k = std::move(seqused_k);
  g.left = window_left;
  g.right = window_right;
  g.max_q = max_seqlen_q;
  g.max_k = max_seqlen_k;
  return g;
}

}  // namespace
}  // namespace entmax_cuda
