// Argument checks of the fused attention ops, shared by the CPU and CUDA
// implementations (the schemas are in attention.cpp; the Python layer gives
// the user-facing messages first, these guard the ops themselves).
#pragma once

#include "attention_decode_math.h"
#include "attention_math.h"
#include "entmax_ops.h"

#include <optional>

namespace entmax_cuda {
namespace {

// B sequences of at most Lq queries and Lk keys. Row tensors (q, grad_out, out,
// alpha, stats) are (rows_b, H, rows_q, ...) and key tensors (rows_b, Hkv, rows_k, ...):
// rows_b = B, rows_q = Lq, rows_k = Lk for a padded batch; rows_b = 1 and the
// sequences packed along the rows (rows_q = total_q, rows_k = total_k) with cu_seqlens.
struct Shape {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  int64_t rows_b, rows_q, rows_k;
};

// The op's arguments beyond the padded batch: ALiBi slopes (B, Hq) in alpha's dtype
// (any strides), a window (left, right; -1 unbounded), and the sequences:
// cu_q/cu_k int32 (B + 1) offsets of packed sequences (max_q/max_k their longest),
// or used_k int32 (B) the keys each batch entry uses of a padded k/v (KV cache).
struct Geometry {
  std::optional<Tensor> alibi, cu_q, cu_k, used_k;
  int64_t left = -1, right = -1, max_q = 0, max_k = 0;
  bool packed() const { return cu_q.has_value(); }
};

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.device().type() == b.device().type() && a.get_device_index() == b.get_device_index();
}

inline void check_seqlens(const char* op, const Tensor& t, const Tensor& q, int64_t n, const char* name) {
  ENTMAX_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == ScalarType::Int && t.is_contiguous(), op, ": ",
               name, " must be a contiguous int32 tensor of ", n, " elements");
  ENTMAX_CHECK(same_device(q, t), op, ": ", name, " must be on q's device");
}

// The offsets of packed sequences, read where they live on the CPU (the Python layer
// checks them on other devices): nondecreasing from 0 to `total`, no sequence longer
// than `max_len`.
inline void check_cu_seqlens_values(const char* op, const Tensor& cu, int64_t total, int64_t max_len,
                                    const char* name) {
  if (!cu.is_cpu()) return;
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t n = cu.size(0) - 1;
  ENTMAX_CHECK(c[0] == 0 && c[n] == total, op, ": ", name, " must start at 0 and end at the total length ", total);
  for (int64_t s = 0; s < n; ++s)
    ENTMAX_CHECK(c[s + 1] >= c[s] && c[s + 1] - c[s] <= max_len, op, ": ", name,
                 " must be nondecreasing with no sequence longer than its max_seqlen (", max_len, ")");
}

inline Shape check_attention_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& alpha, const std::optional<Tensor>& mask, int64_t causal,
                                  const Geometry& g) {
  using namespace entmax_cuda::attention;
  ENTMAX_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k and v must be 4-d (B, H, L, D)");
  check_input(q, "q");
  ENTMAX_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
               ": q, k and v must have the same dtype");
  ENTMAX_CHECK(same_device(q, k) && same_device(q, v) && same_device(q, alpha), op,
               ": q, k, v and alpha must be on the same device");
  Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), q.size(0), q.size(2), k.size(2)};
  ENTMAX_CHECK(k.size(0) == s.rows_b && v.size(0) == s.rows_b, op, ": q, k and v must have the same batch size");
  ENTMAX_CHECK(v.size(1) == s.Hkv && v.size(2) == s.rows_k, op, ": k and v must have the same heads and length");
  ENTMAX_CHECK(k.size(3) == s.D, op, ": q and k must have the same head dimension");
  ENTMAX_CHECK(s.Hkv >= 1 && s.Hq % s.Hkv == 0, op, ": the query heads (", s.Hq,
               ") must be a multiple of the key/value heads (", s.Hkv, ")");
  ENTMAX_CHECK(s.D >= 1 && s.D <= kMaxHeadDim && s.Dv >= 1 && s.Dv <= kMaxHeadDim, op,
               ": head dimensions must lie in [1, ", kMaxHeadDim, "], got ", s.D, " and ", s.Dv);
  ENTMAX_CHECK(alpha.dim() == 3 && alpha.size(0) == s.rows_b && alpha.size(1) == s.Hq && alpha.size(2) == s.rows_q,
               op, ": alpha must have shape (B, Hq, Lq) (packed: (1, Hq, total_q))");
  ENTMAX_CHECK(alpha.scalar_type() == alpha_dtype_for(q.scalar_type()), op,
               ": alpha must be float64 for float64 inputs and float32 otherwise");
  ENTMAX_CHECK(causal == kNotCausal || causal == kCausalUpperLeft || causal == kCausalLowerRight, op,
               ": causal must be 0 (none), 1 (upper-left) or 2 (lower-right), got ", causal);
  ENTMAX_CHECK(g.left >= -1 && g.right >= -1, op, ": window sizes must be -1 (unbounded) or >= 0, got (", g.left,
               ", ", g.right, ")");
  ENTMAX_CHECK(g.cu_q.has_value() == g.cu_k.has_value(), op, ": cu_seqlens_q and cu_seqlens_k go together");
  if (g.packed()) {
    ENTMAX_CHECK(s.rows_b == 1, op, ": packed sequences take q, k, v of batch size 1 (1, H, total, D)");
    ENTMAX_CHECK(!g.used_k.has_value() && !mask.has_value(), op,
                 ": packed sequences take neither seqused_k nor a mask");
    ENTMAX_CHECK(g.cu_q->dim() == 1 && g.cu_q->size(0) >= 1, op, ": cu_seqlens_q must be 1-d with n_seqs + 1 elements");
    s.B = g.cu_q->size(0) - 1;
    check_seqlens(op, *g.cu_q, q, s.B + 1, "cu_seqlens_q");
    check_seqlens(op, *g.cu_k, q, s.B + 1, "cu_seqlens_k");
    ENTMAX_CHECK(g.max_q >= 0 && g.max_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0");
    check_cu_seqlens_values(op, *g.cu_q, s.rows_q, g.max_q, "cu_seqlens_q");
    check_cu_seqlens_values(op, *g.cu_k, s.rows_k, g.max_k, "cu_seqlens_k");
    s.Lq = g.max_q;
    s.Lk = g.max_k;
  } else if (g.used_k.has_value()) {
    check_seqlens(op, *g.used_k, q, s.B, "seqused_k");
    if (g.used_k->is_cpu()) {
      const int32_t* u = g.used_k->const_data_ptr<int32_t>();
      for (int64_t b = 0; b < s.B; ++b)
        ENTMAX_CHECK(u[b] >= 0 && u[b] <= s.Lk, op, ": seqused_k must lie in [0, ", s.Lk, "], got ", u[b]);
    }
  }
  if (g.alibi.has_value()) {
    const Tensor& a = *g.alibi;
    ENTMAX_CHECK(a.dim() == 2 && a.size(0) == s.B && a.size(1) == s.Hq && a.scalar_type() == alpha.scalar_type(), op,
                 ": alibi_slopes must be (B, Hq) in alpha's dtype (broadcast views are fine)");
    ENTMAX_CHECK(same_device(q, a), op, ": alibi_slopes must be on q's device");
  }
  if (mask.has_value()) {
    const Tensor& m = *mask;
    ENTMAX_CHECK(m.dim() == 4 && m.size(0) == s.B && m.size(1) == s.Hq && m.size(2) == s.Lq && m.size(3) == s.Lk, op,
                 ": mask must have shape (B, Hq, Lq, Lk) (broadcast views are fine)");
    ENTMAX_CHECK(m.scalar_type() == ScalarType::Bool || m.scalar_type() == alpha.scalar_type(), op,
                 ": mask must be bool or have alpha's dtype");
    ENTMAX_CHECK(same_device(q, m), op, ": mask must be on q's device");
  }
  return s;
}

// The backward op's arguments: the forward's plus grad_out, stats and block_map.
inline Shape check_attention_backward_args(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& alpha, const std::optional<Tensor>& mask, int64_t causal,
                                           const Geometry& g, const Tensor& stats, const Tensor& block_map) {
  using namespace entmax_cuda::attention;
  const Shape s = check_attention_args("attention_backward", q, k, v, alpha, mask, causal, g);
  const int64_t nQ = num_tiles(s.Lq, kBlockQ), nK = num_tiles(s.Lk, kBlockK);
  ENTMAX_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.rows_b && grad_out.size(1) == s.Hq &&
                   grad_out.size(2) == s.rows_q && grad_out.size(3) == s.Dv && grad_out.scalar_type() == q.scalar_type(),
               "attention_backward: grad_out must have the output's shape (B, Hq, Lq, Dv) and dtype");
  ENTMAX_CHECK(same_device(q, grad_out) && same_device(q, stats) && same_device(q, block_map),
               "attention_backward: grad_out, stats and block_map must be on q's device");
  ENTMAX_CHECK(stats.dim() == 4 && stats.size(0) == s.rows_b && stats.size(1) == s.Hq &&
                   stats.size(2) == kNumStats && stats.size(3) == s.rows_q && stats.scalar_type() == alpha.scalar_type() && stats.is_contiguous(),
               "attention_backward: stats must be the forward's (B, Hq, 4, Lq) statistics");
  ENTMAX_CHECK(block_map.dim() == 4 && block_map.size(0) == s.B && block_map.size(1) == s.Hq &&
                   block_map.size(2) == nQ && block_map.size(3) == nK &&
                   block_map.scalar_type() == ScalarType::Byte && block_map.is_contiguous(),
               "attention_backward: block_map must be the forward's (B, Hq, ceil(Lq/64), ceil(Lk/64)) uint8 map");
  return s;
}

// The decode op's arguments: a padded batch (q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D/Dv)),
// causal bottom-right, ALiBi, a window and seqused_k; num_splits 0 (the op's choice) or
// the splits wanted.
inline Shape check_decode_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha,
                               const Geometry& g, int64_t num_splits) {
  using namespace entmax_cuda::attention;
  ENTMAX_CHECK(!g.packed(), "attention_decode: takes a padded batch (seqused_k), not packed sequences");
  ENTMAX_CHECK(num_splits >= 0 && num_splits <= kDecodeMaxSplits, "attention_decode: num_splits must lie in [0, ",
               kDecodeMaxSplits, "] (0: chosen by the op), got ", num_splits);
  return check_attention_args("attention_decode", q, k, v, alpha, std::nullopt, kCausalLowerRight, g);
}

// The launch plan: num_splits as asked, or (0) enough splits for about target_items work items.
inline attention::DecodePlan decode_plan(const Shape& s, int64_t num_splits, int64_t target_items) {
  using attention::DecodePlan;
  const DecodePlan one(s.B, s.Hq, s.Hkv, s.Lq, s.Lk, 1);
  const int64_t splits =
      num_splits > 0 ? num_splits : attention::decode_splits_for(one.items(), one.nK, target_items);
  return DecodePlan(s.B, s.Hq, s.Hkv, s.Lq, s.Lk, splits);
}

}  // namespace
}  // namespace entmax_cuda
