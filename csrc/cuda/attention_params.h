// Host side of the CUDA attention ops: the op's tensors to kernel parameters,
// its outputs, and the plan of a launch (block-maxima resolution, column
// chunks). Shared by the CUDA op (attention_cuda.cu) and the test build that
// runs the same kernels on the CPU (tests/cuda_emulation), so both prepare a
// call the same way.
#pragma once

#include "../attention_ops.h"
#include "../entmax_ops.h"
#include "attention_decode_kernel.cuh"
#include "attention_kernel_common.cuh"

#include <torch/csrc/stable/ops.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace entmax_cuda {
namespace attention_cuda {
namespace {

// Cap on the forward's block maxima in shared memory (one acc_t per key tile;
// 16384 bytes hold 4096 floats, i.e. 256k keys at full resolution). Past it, or
// past the device's shared memory, one maximum covers 2^bm_shift key tiles:
// fewer blocks are skipped, none wrongly.
constexpr size_t kBlockMaxBytes = 16384;

// Block-maxima resolution of a forward with policy Gemm that fits max_smem bytes
// (sets p.bm_shift, p.n_bm and smem); false when even the coarsest does not fit.
template <class Gemm>
bool fit_block_maxima(AttentionParams& p, size_t max_smem, size_t& smem, size_t cap = kBlockMaxBytes) {
  using acc_t = typename Gemm::acc_t;
  for (int shift = 0; shift < 31; ++shift) {
    const int64_t n_bm = (p.nK + (int64_t(1) << shift) - 1) >> shift;
    const size_t bytes = ForwardSmem<Gemm>(p.D, p.Dv, static_cast<int>(n_bm)).total;
    if ((static_cast<size_t>(n_bm) * sizeof(acc_t) <= cap || n_bm <= 1) && bytes <= max_smem) {
      p.bm_shift = shift;
      p.n_bm = static_cast<int>(n_bm);
      smem = bytes;
      return true;
    }
    if (n_bm <= 1) break;
  }
  return false;
}

// Column chunk of the tensor-core path: 64 covers head dims up to 64 in one chunk, wider ones take 128.
inline int tensor_core_chunk(const AttentionParams& p) { return (p.D <= 64 && p.Dv <= 64) ? 64 : 128; }

// The key sweep's jobs: column chunks of dV, then of dK.
template <class Gemm>
void set_chunks(AttentionParams& p) {
  p.chunks_v = static_cast<int>(attention::num_tiles(p.Dv, Gemm::kChunk));
  p.chunks_k = static_cast<int>(attention::num_tiles(p.D, Gemm::kChunk));
}

inline void set_tensor(const Tensor& t, const void*& ptr, int64_t (&st)[4], bool& vec16) {
  ptr = t.const_data_ptr();
  for (int d = 0; d < 4; ++d) st[d] = t.stride(d);
  const int64_t per16 = 16 / static_cast<int64_t>(t.element_size());
  vec16 = st[3] == 1 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && st[0] % per16 == 0 && st[1] % per16 == 0 &&
          st[2] % per16 == 0;
}

inline AttentionParams make_params(const Shape& s, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& alpha, const std::optional<Tensor>& mask, int64_t causal,
                                   double scale, const Geometry& g) {
  constexpr int64_t kMaxLength = std::numeric_limits<int32_t>::max();
  ENTMAX_CHECK(s.rows_q <= kMaxLength && s.rows_k <= kMaxLength && s.Lq <= kMaxLength && s.Lk <= kMaxLength,
               "entmax attention (CUDA): lengths above 2^31 - 1 (got ", s.rows_q, " and ", s.rows_k, ")");
  AttentionParams p{};
  set_tensor(q, p.q, p.q_st, p.q_vec16);
  set_tensor(k, p.k, p.k_st, p.k_vec16);
  set_tensor(v, p.v, p.v_st, p.v_vec16);
  p.alpha = alpha.const_data_ptr();
  for (int d = 0; d < 3; ++d) p.alpha_st[d] = alpha.stride(d);
  p.mask_kind = kNoMask;
  if (mask.has_value()) {
    p.mask = mask->const_data_ptr();
    for (int d = 0; d < 4; ++d) p.mask_st[d] = mask->stride(d);
    p.mask_kind = mask->scalar_type() == ScalarType::Bool ? kBoolMask : kAdditiveMask;
  }
  p.causal = static_cast<int>(causal);
  p.alibi = nullptr;
  if (g.alibi.has_value()) {
    p.alibi = g.alibi->const_data_ptr();
    p.alibi_st[0] = g.alibi->stride(0);
    p.alibi_st[1] = g.alibi->stride(1);
  }
  p.window_left = g.left;
  p.window_right = g.right;
  p.packed = g.packed();
  p.cu_q = p.packed ? static_cast<const int32_t*>(g.cu_q->const_data_ptr()) : nullptr;
  p.cu_k = p.packed ? static_cast<const int32_t*>(g.cu_k->const_data_ptr()) : nullptr;
  p.used_k = g.used_k.has_value() ? static_cast<const int32_t*>(g.used_k->const_data_ptr()) : nullptr;
  p.rows_q = s.rows_q;
  p.rows_k = s.rows_k;
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.group = s.Hq / s.Hkv;
  p.Lq = s.Lq;
  p.Lk = s.Lk;
  p.nQ = attention::num_tiles(s.Lq, attention::kBlockQ);
  p.nK = attention::num_tiles(s.Lk, attention::kBlockK);
  p.D = static_cast<int>(s.D);
  p.Dv = static_cast<int>(s.Dv);
  p.scale = scale;
  constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();
  const int64_t max_jobs = 2 * attention::num_tiles(attention::kMaxHeadDim, 64);  // dV and dK chunks of 64
  ENTMAX_CHECK(p.B * p.Hq * p.nQ <= kMaxGrid && max_jobs * p.B * p.Hkv * p.nK <= kMaxGrid,
               "entmax attention (CUDA): too many (batch, head, tile) blocks for one launch");
  return p;
}

// A forward call: its outputs and the kernels' parameters (`empty`: nothing to compute).
struct AttentionForwardCall {
  Tensor out, stats, block_map;
  AttentionParams p;
  bool empty;
};

inline AttentionForwardCall prepare_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha,
                                            const std::optional<Tensor>& mask, int64_t causal, double scale,
                                            const Geometry& g) {
  const Shape s = check_attention_args("attention_forward", q, k, v, alpha, mask, causal, g);
  const int64_t nQ = attention::num_tiles(s.Lq, attention::kBlockQ);
  const int64_t nK = attention::num_tiles(s.Lk, attention::kBlockK);
  AttentionForwardCall call{torch::stable::new_empty(q, {s.rows_b, s.Hq, s.rows_q, s.Dv}),
                   torch::stable::new_empty(alpha, {s.rows_b, s.Hq, attention::kNumStats, s.rows_q}),
                   torch::stable::new_empty(q, {s.B, s.Hq, nQ, nK}, ScalarType::Byte), AttentionParams{},
                   s.B * s.Hq * s.Lq == 0};
  if (call.empty) return call;
  call.p = make_params(s, q, k, v, alpha, mask, causal, scale, g);
  call.p.out = call.out.mutable_data_ptr();
  call.p.stats = call.stats.mutable_data_ptr();
  call.p.block_map = static_cast<uint8_t*>(call.block_map.mutable_data_ptr());
  return call;
}

struct AttentionBackwardCall {
  Tensor dq, dk, dv, dalpha, q_rows;
  AttentionParams p;
  bool empty;
};

inline AttentionBackwardCall prepare_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& alpha, const std::optional<Tensor>& mask, int64_t causal,
                                     double scale, const Geometry& g, const Tensor& stats, const Tensor& block_map,
                                     bool alpha_grad) {
  const Shape s = check_attention_backward_args(grad_out, q, k, v, alpha, mask, causal, g, stats, block_map);
  AttentionBackwardCall call;
  call.empty = s.B * s.Hq * s.Lq == 0;
  if (call.empty) {  // no query: nothing reaches k, v or alpha
    call.dq = torch::stable::new_empty(q, {s.rows_b, s.Hq, s.rows_q, s.D});
    call.dk = torch::stable::new_zeros(k, {s.rows_b, s.Hkv, s.rows_k, s.D});
    call.dv = torch::stable::new_zeros(v, {s.rows_b, s.Hkv, s.rows_k, s.Dv});
    call.dalpha = torch::stable::new_zeros(alpha, {s.rows_b, s.Hq, s.rows_q});
    return call;
  }
  // Every element of these is written by the kernels (packed: every row belongs to a sequence).
  call.dq = torch::stable::new_empty(q, {s.rows_b, s.Hq, s.rows_q, s.D});
  call.dk = torch::stable::new_empty(k, {s.rows_b, s.Hkv, s.rows_k, s.D});
  call.dv = torch::stable::new_empty(v, {s.rows_b, s.Hkv, s.rows_k, s.Dv});
  call.dalpha = torch::stable::new_empty(alpha, {s.rows_b, s.Hq, s.rows_q});
  call.q_rows = torch::stable::new_empty(alpha, {s.rows_b, s.Hq, s.rows_q});
  AttentionParams& p = call.p;
  p = make_params(s, q, k, v, alpha, mask, causal, scale, g);
  set_tensor(grad_out, p.grad_out, p.do_st, p.do_vec16);
  p.stats = const_cast<void*>(stats.const_data_ptr());
  p.block_map = const_cast<uint8_t*>(static_cast<const uint8_t*>(block_map.const_data_ptr()));
  p.grad_q = call.dq.mutable_data_ptr();
  p.grad_k = call.dk.mutable_data_ptr();
  p.grad_v = call.dv.mutable_data_ptr();
  p.grad_alpha = call.dalpha.mutable_data_ptr();
  p.q_rows = call.q_rows.mutable_data_ptr();
  p.alpha_grad = alpha_grad;
  return call;
}

// A decode call: its outputs, the kernels' parameters and the plan (`empty`: nothing to
// compute). target_items: the work items that fill the device, for num_splits = 0.
struct AttentionDecodeCall {
  Tensor out, stats;
  AttentionParams p;
  attention::DecodePlan plan;
  bool empty;
};

inline AttentionDecodeCall prepare_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha,
                                          double scale, const Geometry& g, int64_t num_splits,
                                          int64_t target_items) {
  const Shape s = check_decode_args(q, k, v, alpha, g, num_splits);
  AttentionDecodeCall call{torch::stable::new_empty(q, {s.B, s.Hq, s.Lq, s.Dv}),
                           torch::stable::new_empty(alpha, {s.B, s.Hq, attention::kNumStats, s.Lq}),
                           AttentionParams{}, decode_plan(s, num_splits, target_items), s.B * s.Hq * s.Lq == 0};
  if (call.empty) return call;
  call.p = make_params(s, q, k, v, alpha, std::nullopt, attention::kCausalLowerRight, scale, g);
  call.p.out = call.out.mutable_data_ptr();
  call.p.stats = call.stats.mutable_data_ptr();
  ENTMAX_CHECK(call.plan.items() <= std::numeric_limits<int32_t>::max() &&
                   attention::num_tiles(call.plan.rows(), kThreads) <= std::numeric_limits<int32_t>::max(),
               "entmax attention (CUDA): too many decoding work items for one launch");
  return call;
}

// The decode buffers of a call in one workspace tensor on q's device (sizes linear in
// rows x splits x Dv and in rows x key tiles; none in the cache length alone).
template <typename acc_t>
DecodeBuffers<acc_t> decode_buffers(const AttentionDecodeCall& call, const Tensor& q, Tensor& workspace) {
  const attention::DecodePlan& plan = call.plan;
  const size_t rows = static_cast<size_t>(plan.rows()), splits = static_cast<size_t>(plan.splits);
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += align16(bytes);
    return here;
  };
  const size_t summary = take(rows * splits * sizeof(attention::SplitSummary<acc_t>));
  const size_t block_max = take(rows * static_cast<size_t>(plan.nK) * sizeof(acc_t));
  const size_t row_state = take(rows * sizeof(attention::DecodeRow<acc_t>));
  const size_t sums = take(rows * splits * 2 * sizeof(double));
  const size_t partial = take(rows * splits * static_cast<size_t>(call.p.Dv) * sizeof(acc_t));
  const size_t pending = take(sizeof(int));
  workspace = torch::stable::new_empty(q, {static_cast<int64_t>(at)}, ScalarType::Byte);
  unsigned char* base = static_cast<unsigned char*>(workspace.mutable_data_ptr());
  return DecodeBuffers<acc_t>{plan,
                              reinterpret_cast<attention::SplitSummary<acc_t>*>(base + summary),
                              reinterpret_cast<acc_t*>(base + block_max),
                              reinterpret_cast<attention::DecodeRow<acc_t>*>(base + row_state),
                              reinterpret_cast<double*>(base + sums),
                              reinterpret_cast<acc_t*>(base + partial),
                              reinterpret_cast<int*>(base + pending)};
}

}  // namespace
}  // namespace attention_cuda
}  // namespace entmax_cuda
