// The CUDA attention kernels (csrc/cuda/attention_fwd_kernel.cuh, attention_bwd_kernel.cuh) run on the CPU
// under cuda_emulation.h, as ops of a test library, so that the tests compare
// them with the CPU kernel without a GPU (tests/test_attention_cuda_emulation.py):
//
//   entmax_cuda_emulation::attention_forward(q, k, v, alpha, mask?, causal, scale, policy, block_max_bytes,
//                                            schedule, <geometry>)
//   entmax_cuda_emulation::attention_backward(grad_out, q, k, v, alpha, mask?, causal, scale, stats,
//                                             block_map, alpha_grad, policy, schedule, <geometry>)
//   entmax_cuda_emulation::attention_decode(q, k, v, alpha, scale, alibi_slopes?, window_left,
//                                           window_right, seqused_k?, num_splits, target_items, schedule)
// on CPU tensors; policy 0: SimtGemm, 1: TcGemm with 64-column chunks, 2: with 128
// (float16 / bfloat16 only), 3: as 1 with Turing's float16 mma (two m16n8k8 per
// m16n8k16; float16 only), -1: the CUDA op's choice on a GPU with tensor cores for
// both half types (TcGemm with tensor_core_chunk for them, else SimtGemm);
// block_max_bytes: the forward's cap on block maxima
// (0: the CUDA op's); schedule: the order the emulated threads run in (cuda_emulation.h's
// run_cta: 0 in order, else random from it). The calls are prepared by the CUDA op's own code
// (attention_params.h); each CTA runs with 128 emulated threads, one after another.
#define ENTMAX_CUDA_EMULATION 1
#include "cuda_emulation.h"

#include "../../csrc/cuda/attention_bwd_kernel.cuh"
#include "../../csrc/cuda/attention_decode_kernel.cuh"
#include "../../csrc/cuda/attention_fwd_kernel.cuh"
#include "../../csrc/cuda/attention_params.h"

#include <torch/csrc/stable/library.h>

#include <tuple>

namespace entmax_cuda {
namespace {

using namespace attention_cuda;

template <class Gemm>
void run_forward(AttentionParams p, int64_t block_max_bytes, unsigned schedule) {
  size_t smem = 0;
  const size_t cap = block_max_bytes > 0 ? static_cast<size_t>(block_max_bytes) : kBlockMaxBytes;
  ENTMAX_CHECK(fit_block_maxima<Gemm>(p, SIZE_MAX, smem, cap), "emulation: no block-maxima layout");
  for (int64_t block = 0; block < p.B * p.Hq * p.nQ; ++block)
    emulation::run_cta(kThreads, smem, static_cast<unsigned>(block), [&] { forward_tile<Gemm>(p); }, schedule);
}

template <class Gemm>
void run_backward(AttentionParams p, unsigned schedule) {
  set_chunks<Gemm>(p);
  const size_t rows_smem = RowsSmem<Gemm>(p.D, p.Dv).total, keys_smem = KeysSmem<Gemm>(p.D, p.Dv).total;
  for (int64_t block = 0; block < p.B * p.Hq * p.nQ; ++block)
    emulation::run_cta(kThreads, rows_smem, static_cast<unsigned>(block), [&] { backward_rows_tile<Gemm>(p); },
                       schedule);
  const int64_t key_blocks = (p.chunks_v + p.chunks_k) * p.B * p.Hkv * p.nK;
  for (int64_t block = 0; block < key_blocks; ++block)
    emulation::run_cta(kThreads, keys_smem, static_cast<unsigned>(block), [&] { backward_keys_tile<Gemm>(p); },
                       schedule);
}

// Step<Gemm>(p) for the dtype of `dtype` and the policy number.
template <template <class> class Step, typename... Args>
void dispatch(ScalarType dtype, int64_t policy, const AttentionParams& p, Args... args) {
  ENTMAX_CHECK(policy >= -1 && policy <= 3,
               "emulation: policy must be -1 (auto), 0 (SIMT), 1 (TC, 64), 2 (TC, 128) or 3 (TC, 64, sm_75)");
  ENTMAX_CHECK(policy != 3 || dtype == ScalarType::Half, "emulation: Turing's tensor cores take float16 only");
  emulation::turing_mma() = policy == 3;
  if (policy == 3) policy = 1;
  if (policy == -1) {
    const bool half = dtype == ScalarType::Half || dtype == ScalarType::BFloat16;
    policy = !half ? 0 : (tensor_core_chunk(p) == 64 ? 1 : 2);
  }
  const bool tc = policy > 0;
  switch (dtype) {
    case ScalarType::Float:
      ENTMAX_CHECK(!tc, "emulation: tensor cores take float16 or bfloat16");
      return Step<SimtGemm<float>>::run(p, args...);
    case ScalarType::Double:
      ENTMAX_CHECK(!tc, "emulation: tensor cores take float16 or bfloat16");
      return Step<SimtGemm<double>>::run(p, args...);
    case ScalarType::Half:
      if (!tc) return Step<SimtGemm<__half>>::run(p, args...);
      if (policy == 1) return Step<TcGemm<__half, 64>>::run(p, args...);
      return Step<TcGemm<__half, 128>>::run(p, args...);
    case ScalarType::BFloat16:
      if (!tc) return Step<SimtGemm<__nv_bfloat16>>::run(p, args...);
      if (policy == 1) return Step<TcGemm<__nv_bfloat16, 64>>::run(p, args...);
      return Step<TcGemm<__nv_bfloat16, 128>>::run(p, args...);
    default:
      ENTMAX_CHECK(false, "emulation: unsupported dtype");
  }
}

template <class Gemm>
struct Forward {
  static void run(const AttentionParams& p, int64_t block_max_bytes, unsigned schedule) {
    run_forward<Gemm>(p, block_max_bytes, schedule);
  }
};
template <class Gemm>
struct Backward {
  static void run(const AttentionParams& p, unsigned schedule) { run_backward<Gemm>(p, schedule); }
};

std::tuple<Tensor, Tensor, Tensor> emulated_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& alpha, std::optional<Tensor> mask, int64_t causal,
                                                    double scale, int64_t policy, int64_t block_max_bytes,
                                                    int64_t schedule, std::optional<Tensor> alibi_slopes,
                                                    int64_t window_left, int64_t window_right,
                                                    std::optional<Tensor> cu_seqlens_q,
                                                    std::optional<Tensor> cu_seqlens_k,
                                                    std::optional<Tensor> seqused_k, int64_t max_seqlen_q,
                                                    int64_t max_seqlen_k) {
  ENTMAX_CHECK(q.is_cpu(), "emulation: CPU tensors");
  const Geometry g{alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, window_left, window_right, max_seqlen_q,
                   max_seqlen_k};
  const AttentionForwardCall call = prepare_forward(q, k, v, alpha, mask, causal, scale, g);
  if (!call.empty)
    dispatch<Forward>(q.scalar_type(), policy, call.p, block_max_bytes, static_cast<unsigned>(schedule));
  return std::make_tuple(call.out, call.stats, call.block_map);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> emulated_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const Tensor& alpha,
                                                             std::optional<Tensor> mask, int64_t causal, double scale,
                                                             const Tensor& stats, const Tensor& block_map,
                                                             bool alpha_grad, int64_t policy, int64_t schedule,
                                                             std::optional<Tensor> alibi_slopes,
                                                             int64_t window_left, int64_t window_right,
                                                             std::optional<Tensor> cu_seqlens_q,
                                                             std::optional<Tensor> cu_seqlens_k,
                                                             std::optional<Tensor> seqused_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k) {
  ENTMAX_CHECK(q.is_cpu(), "emulation: CPU tensors");
  const Geometry g{alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, window_left, window_right, max_seqlen_q,
                   max_seqlen_k};
  const AttentionBackwardCall call =
      prepare_backward(grad_out, q, k, v, alpha, mask, causal, scale, g, stats, block_map, alpha_grad);
  if (!call.empty) dispatch<Backward>(q.scalar_type(), policy, call.p, static_cast<unsigned>(schedule));
  return std::make_tuple(call.dq, call.dk, call.dv, call.dalpha);
}

// The CUDA op's decode loop (run_decode_passes) with each launch run CTA by CTA.
template <typename T>
struct EmulatedDecodeRunner {
  using acc_t = typename Scalar<T>::acc;
  const AttentionParams& p;
  const DecodeBuffers<acc_t>& w;
  unsigned schedule;

  void pass(int phase) {
    for (int64_t item = 0; item < w.plan.items(); ++item)
      emulation::run_cta(kThreads, DecodeSmem<acc_t>::bytes, static_cast<unsigned>(item),
                         [&] { decode_pass<T>(p, w, phase); }, schedule);
  }
  int64_t merge(int which) {
    *w.pending = 0;
    for (int64_t block = 0; block < attention::num_tiles(w.plan.rows(), kThreads); ++block)
      emulation::run_cta(kThreads, 0, static_cast<unsigned>(block), [&] { decode_merge<T>(p, w, which); },
                         schedule);
    return *w.pending;
  }
  int64_t merge_start() { return merge(kMergeStart); }
  int64_t merge_threshold() { return merge(kMergeThreshold); }
  int64_t merge_output() { return merge(kMergeOutput); }
};

template <typename T>
void run_decode(const AttentionDecodeCall& call, const Tensor& q, unsigned schedule) {
  Tensor workspace;
  const DecodeBuffers<typename Scalar<T>::acc> w = decode_buffers<typename Scalar<T>::acc>(call, q, workspace);
  EmulatedDecodeRunner<T> runner{call.p, w, schedule};
  ENTMAX_CHECK(attention::run_decode_passes(runner, call.plan.rows()), "emulation: a decode threshold search did not end");
}

// target_items: the work items that would fill the emulated device (for num_splits = 0).
std::tuple<Tensor, Tensor> emulated_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& alpha,
                                           double scale, std::optional<Tensor> alibi_slopes, int64_t window_left,
                                           int64_t window_right, std::optional<Tensor> seqused_k,
                                           int64_t num_splits, int64_t target_items, int64_t schedule) {
  ENTMAX_CHECK(q.is_cpu(), "emulation: CPU tensors");
  const Geometry g{alibi_slopes, std::nullopt, std::nullopt, seqused_k, window_left, window_right, 0, 0};
  const AttentionDecodeCall call = prepare_decode(q, k, v, alpha, scale, g, num_splits, target_items);
  if (call.empty) return std::make_tuple(call.out, call.stats);
  const unsigned sched = static_cast<unsigned>(schedule);
  switch (q.scalar_type()) {
    case ScalarType::Float: run_decode<float>(call, q, sched); break;
    case ScalarType::Double: run_decode<double>(call, q, sched); break;
    case ScalarType::Half: run_decode<__half>(call, q, sched); break;
    case ScalarType::BFloat16: run_decode<__nv_bfloat16>(call, q, sched); break;
    default: ENTMAX_CHECK(false, "emulation: unsupported dtype");
  }
  return std::make_tuple(call.out, call.stats);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY(entmax_cuda_emulation, m) {
  // The CUDA ops' schemas (csrc/attention.cpp) with the emulation's policy and schedule
  // before the geometry arguments.
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor? mask, int causal, float scale, "
        "int policy, int block_max_bytes, int schedule, Tensor? alibi_slopes=None, int window_left=-1, "
        "int window_right=-1, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? seqused_k=None, "
        "int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor, Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor? mask, int causal, "
        "float scale, Tensor stats, Tensor block_map, bool alpha_grad, int policy, int schedule, "
        "Tensor? alibi_slopes=None, int window_left=-1, int window_right=-1, Tensor? cu_seqlens_q=None, "
        "Tensor? cu_seqlens_k=None, Tensor? seqused_k=None, int max_seqlen_q=0, int max_seqlen_k=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_decode(Tensor q, Tensor k, Tensor v, Tensor alpha, float scale, Tensor? alibi_slopes, "
        "int window_left, int window_right, Tensor? seqused_k, int num_splits, int target_items, int schedule) "
        "-> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda_emulation, CPU, m) {
  m.impl("attention_forward", TORCH_BOX(&entmax_cuda::emulated_forward));
  m.impl("attention_backward", TORCH_BOX(&entmax_cuda::emulated_backward));
  m.impl("attention_decode", TORCH_BOX(&entmax_cuda::emulated_decode));
}
