// Argument checks of the fused attention ops, shared by the CPU and CUDA
// implementations (the schemas are in attention.cpp; the Python layer gives
// the user-facing messages first, these guard the ops themselves).
#pragma once

#include "attention_math.h"
#include "entmax_ops.h"

#include <optional>

namespace entmax_cuda {
namespace {

struct Shape {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.device().type() == b.device().type() && a.get_device_index() == b.get_device_index();
}

inline Shape check_attention_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& alpha, const std::optional<Tensor>& mask, int64_t causal) {
  using namespace entmax_cuda::attention;
  ENTMAX_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k and v must be 4-d (B, H, L, D)");
  check_input(q, "q");
  ENTMAX_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
               ": q, k and v must have the same dtype");
  ENTMAX_CHECK(same_device(q, k) && same_device(q, v) && same_device(q, alpha), op,
               ": q, k, v and alpha must be on the same device");
  Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  ENTMAX_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": q, k and v must have the same batch size");
  ENTMAX_CHECK(v.size(1) == s.Hkv && v.size(2) == s.Lk, op, ": k and v must have the same heads and length");
  ENTMAX_CHECK(k.size(3) == s.D, op, ": q and k must have the same head dimension");
  ENTMAX_CHECK(s.Hkv >= 1 && s.Hq % s.Hkv == 0, op, ": the query heads (", s.Hq,
               ") must be a multiple of the key/value heads (", s.Hkv, ")");
  ENTMAX_CHECK(s.D >= 1 && s.D <= kMaxHeadDim && s.Dv >= 1 && s.Dv <= kMaxHeadDim, op,
               ": head dimensions must lie in [1, ", kMaxHeadDim, "], got ", s.D, " and ", s.Dv);
  ENTMAX_CHECK(alpha.dim() == 3 && alpha.size(0) == s.B && alpha.size(1) == s.Hq && alpha.size(2) == s.Lq, op,
               ": alpha must have shape (B, Hq, Lq)");
  ENTMAX_CHECK(alpha.scalar_type() == alpha_dtype_for(q.scalar_type()), op,
               ": alpha must be float64 for float64 inputs and float32 otherwise");
  ENTMAX_CHECK(causal == kNotCausal || causal == kCausalUpperLeft || causal == kCausalLowerRight, op,
               ": causal must be 0 (none), 1 (upper-left) or 2 (lower-right), got ", causal);
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
                                           const Tensor& stats, const Tensor& block_map) {
  using namespace entmax_cuda::attention;
  const Shape s = check_attention_args("attention_backward", q, k, v, alpha, mask, causal);
  const int64_t nQ = num_tiles(s.Lq, kBlockQ), nK = num_tiles(s.Lk, kBlockK);
  ENTMAX_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.B && grad_out.size(1) == s.Hq &&
                   grad_out.size(2) == s.Lq && grad_out.size(3) == s.Dv && grad_out.scalar_type() == q.scalar_type(),
               "attention_backward: grad_out must have the output's shape (B, Hq, Lq, Dv) and dtype");
  ENTMAX_CHECK(same_device(q, grad_out) && same_device(q, stats) && same_device(q, block_map),
               "attention_backward: grad_out, stats and block_map must be on q's device");
  ENTMAX_CHECK(stats.dim() == 4 && stats.size(0) == s.B && stats.size(1) == s.Hq && stats.size(2) == kNumStats &&
                   stats.size(3) == s.Lq && stats.scalar_type() == alpha.scalar_type() && stats.is_contiguous(),
               "attention_backward: stats must be the forward's (B, Hq, 4, Lq) statistics");
  ENTMAX_CHECK(block_map.dim() == 4 && block_map.size(0) == s.B && block_map.size(1) == s.Hq &&
                   block_map.size(2) == nQ && block_map.size(3) == nK &&
                   block_map.scalar_type() == ScalarType::Byte && block_map.is_contiguous(),
               "attention_backward: block_map must be the forward's (B, Hq, ceil(Lq/64), ceil(Lk/64)) uint8 map");
  return s;
}

}  // namespace
}  // namespace entmax_cuda
