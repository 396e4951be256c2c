// CUDA implementation of the fused attention ops (schemas: csrc/attention.cpp):
// tensors to kernel parameters, the choice of matmul path, launches on the
// current stream. The kernels are in attention_fwd_kernel.cuh and
// attention_bwd_kernel.cuh (instantiated in attention_simt_*.cu and attention_tc_*.cu).
//
// Paths: tensor cores (mma.sync) for float16 on sm_75+ and bfloat16 on sm_80+
// when the tiles fit in shared memory, else SIMT (every dtype, float32 exact).
// ENTMAX_ATTENTION_PATH=simt forces SIMT; =tensor_core requires tensor cores
// (an error where they cannot run); unset or "auto" chooses.
#include "../entmax_ops.h"
#include "attention_launch.cuh"
#include "attention_params.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

namespace entmax_cuda {
namespace attention_cuda {
ENTMAX_ATTENTION_ALL_POLICIES(extern)
ENTMAX_DECODE_ALL_TYPES(extern)
}  // namespace attention_cuda

namespace {

using namespace attention_cuda;

// The name of the path switch (docs/attention.md).
constexpr const char* kPathVariable = "ENTMAX_ATTENTION_PATH";
enum class PathRequest { kAuto, kSimt, kTensorCore };

PathRequest requested_path() {
  const char* value = std::getenv(kPathVariable);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) return PathRequest::kAuto;
  if (std::strcmp(value, "simt") == 0) return PathRequest::kSimt;
  if (std::strcmp(value, "tensor_core") == 0) return PathRequest::kTensorCore;
  ENTMAX_CHECK(false, "entmax attention: ", kPathVariable, " must be auto, simt or tensor_core, got '", value, "'");
  return PathRequest::kAuto;
}

void check_cuda(cudaError_t err, const char* what) {
  ENTMAX_CHECK(err == cudaSuccess, "entmax attention: ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

struct Device {
  int cc;           // compute capability, 10 * major + minor
  size_t max_smem;  // opt-in shared memory per block
};

Device device_of(const Tensor& t) {
  const int index = t.get_device_index();
  int major = 0, minor = 0, smem = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index), "reading the device's arch");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index), "reading the device's arch");
  check_cuda(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, index),
             "reading the device's shared memory");
  return Device{10 * major + minor, static_cast<size_t>(smem)};
}

// torch's dtypes as the kernels' types.
template <typename T> struct KernelType { using type = T; };
template <> struct KernelType<torch::headeronly::Half> { using type = __half; };
template <> struct KernelType<torch::headeronly::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
constexpr bool is_half_type() {
  return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
}

// Whether the tensor-core path can run dtype T on this device (arch only; shared memory is checked per kernel).
template <typename T>
bool tensor_cores_for(const Device& dev) {
  if constexpr (std::is_same<T, __half>::value) return dev.cc >= 75;
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return dev.cc >= 80;
  else return false;
}

std::string no_tensor_cores(const char* op, const char* why) {
  return concat("entmax attention: ", kPathVariable, "=tensor_core, but ", op, " cannot use tensor cores here: ",
                why);
}

// The forward with policy Gemm, if its tiles fit the device's shared memory.
template <class Gemm>
bool try_forward(AttentionParams p, const Device& dev, cudaStream_t stream) {
  size_t smem = 0;
  if (!fit_block_maxima<Gemm>(p, dev.max_smem, smem)) return false;
  check_cuda(launch_attention_forward<Gemm>(p, smem, stream), "the attention forward launch");
  return true;
}

template <class Gemm>
bool try_backward(AttentionParams p, const Device& dev, cudaStream_t stream) {
  if (rows_smem_bytes<Gemm>(p) > dev.max_smem || keys_smem_bytes<Gemm>(p) > dev.max_smem) return false;
  set_chunks<Gemm>(p);
  check_cuda(launch_attention_backward<Gemm>(p, stream), "the attention backward launch");
  return true;
}

// Runs Step<Gemm> with the tensor-core policy where it can, else SIMT (kernel-type T).
template <typename T, template <class> class Step>
void run(const char* op, const AttentionParams& p, const Device& dev, cudaStream_t stream) {
  const PathRequest want = requested_path();
  if constexpr (is_half_type<T>()) {
    if (want != PathRequest::kSimt && tensor_cores_for<T>(dev)) {
      const bool done = tensor_core_chunk(p) == 64 ? Step<TcGemm<T, 64>>::run(p, dev, stream)
                                                    : Step<TcGemm<T, 128>>::run(p, dev, stream);
      if (done) return;
      ENTMAX_CHECK(want != PathRequest::kTensorCore,
                   no_tensor_cores(op, "its tiles do not fit in the device's shared memory"));
    }
    ENTMAX_CHECK(want != PathRequest::kTensorCore,
                 no_tensor_cores(op, "float16 needs sm_75 and bfloat16 sm_80"));
  } else {
    ENTMAX_CHECK(want != PathRequest::kTensorCore, no_tensor_cores(op, "tensor cores serve float16 and bfloat16"));
  }
  ENTMAX_CHECK(Step<SimtGemm<T>>::run(p, dev, stream), "entmax attention: ", op,
               " does not fit in the device's shared memory (", dev.max_smem, " bytes per block)");
}

template <class Gemm>
struct ForwardStep {
  static bool run(const AttentionParams& p, const Device& dev, cudaStream_t s) { return try_forward<Gemm>(p, dev, s); }
};
template <class Gemm>
struct BackwardStep {
  static bool run(const AttentionParams& p, const Device& dev, cudaStream_t s) { return try_backward<Gemm>(p, dev, s); }
};

std::tuple<Tensor, Tensor, Tensor> attention_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          const Tensor& alpha, std::optional<Tensor> mask,
                                                          int64_t causal, double scale,
                                                          std::optional<Tensor> alibi_slopes, int64_t window_left,
                                                          int64_t window_right, std::optional<Tensor> cu_seqlens_q,
                                                          std::optional<Tensor> cu_seqlens_k,
                                                          std::optional<Tensor> seqused_k, int64_t max_seqlen_q,
                                                          int64_t max_seqlen_k) {
  ENTMAX_CHECK(q.is_cuda(), "attention_forward (CUDA): tensors must be CUDA tensors");
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const Geometry g{alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, window_left, window_right, max_seqlen_q,
                   max_seqlen_k};
  const AttentionForwardCall call = prepare_forward(q, k, v, alpha, mask, causal, scale, g);
  if (!call.empty) {
    const Device dev = device_of(q);
    const cudaStream_t stream = stream_of(q);
    dispatch_float_types(q.scalar_type(), [&](auto tag) {
      run<typename KernelType<decltype(tag)>::type, ForwardStep>("the forward", call.p, dev, stream);
    });
  }
  return std::make_tuple(call.out, call.stats, call.block_map);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward_cuda(const Tensor& grad_out, const Tensor& q,
                                                                   const Tensor& k, const Tensor& v,
                                                                   const Tensor& alpha, std::optional<Tensor> mask,
                                                                   int64_t causal, double scale, const Tensor& stats,
                                                                   const Tensor& block_map, bool alpha_grad,
                                                                   std::optional<Tensor> alibi_slopes,
                                                                   int64_t window_left, int64_t window_right,
                                                                   std::optional<Tensor> cu_seqlens_q,
                                                                   std::optional<Tensor> cu_seqlens_k,
                                                                   std::optional<Tensor> seqused_k,
                                                                   int64_t max_seqlen_q, int64_t max_seqlen_k) {
  ENTMAX_CHECK(q.is_cuda(), "attention_backward (CUDA): tensors must be CUDA tensors");
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const Geometry g{alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, window_left, window_right, max_seqlen_q,
                   max_seqlen_k};
  const AttentionBackwardCall call =
      prepare_backward(grad_out, q, k, v, alpha, mask, causal, scale, g, stats, block_map, alpha_grad);
  if (!call.empty) {
    const Device dev = device_of(q);
    const cudaStream_t stream = stream_of(q);
    dispatch_float_types(q.scalar_type(), [&](auto tag) {
      run<typename KernelType<decltype(tag)>::type, BackwardStep>("the backward", call.p, dev, stream);
    });
  }
  return std::make_tuple(call.dq, call.dk, call.dv, call.dalpha);
}

// The passes and merges of run_decode_passes on the GPU: launches on the call's stream;
// a merge ends with one read of the count of rows left in the threshold phase (a host
// synchronisation: the loop's length depends on the data).
template <typename T>
struct CudaDecodeRunner {
  using acc_t = typename Scalar<T>::acc;
  const AttentionParams& p;
  const DecodeBuffers<acc_t>& w;
  cudaStream_t stream;

  void pass(int phase) { check_cuda(launch_decode_pass<T>(p, w, phase, stream), "the decode pass launch"); }
  int64_t merge(int which) {
    check_cuda(cudaMemsetAsync(w.pending, 0, sizeof(int), stream), "clearing the decode count");
    check_cuda(launch_decode_merge<T>(p, w, which, stream), "the decode merge launch");
    int pending = 0;
    check_cuda(cudaMemcpyAsync(&pending, w.pending, sizeof(int), cudaMemcpyDeviceToHost, stream),
               "reading the decode count");
    check_cuda(cudaStreamSynchronize(stream), "the decode merge");
    return pending;
  }
  int64_t merge_start() { return merge(kMergeStart); }
  int64_t merge_threshold() { return merge(kMergeThreshold); }
  int64_t merge_output() { return merge(kMergeOutput); }
};

// Work items that fill the device: two CTAs per multiprocessor.
int64_t decode_target_items(const Tensor& q) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device_index()),
             "reading the device's multiprocessors");
  return 2 * static_cast<int64_t>(sms);
}

std::tuple<Tensor, Tensor> attention_decode_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& alpha, double scale,
                                                 std::optional<Tensor> alibi_slopes, int64_t window_left,
                                                 int64_t window_right, std::optional<Tensor> seqused_k,
                                                 int64_t num_splits) {
  ENTMAX_CHECK(q.is_cuda(), "attention_decode (CUDA): tensors must be CUDA tensors");
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const Geometry g{alibi_slopes, std::nullopt, std::nullopt, seqused_k, window_left, window_right, 0, 0};
  const AttentionDecodeCall call = prepare_decode(q, k, v, alpha, scale, g, num_splits, decode_target_items(q));
  if (!call.empty) {
    const cudaStream_t stream = stream_of(q);
    dispatch_float_types(q.scalar_type(), [&](auto tag) {
      using T = typename KernelType<decltype(tag)>::type;
      Tensor workspace;
      const DecodeBuffers<typename Scalar<T>::acc> w = decode_buffers<typename Scalar<T>::acc>(call, q, workspace);
      CudaDecodeRunner<T> runner{call.p, w, stream};
      ENTMAX_CHECK(attention::run_decode_passes(runner, call.plan.rows()), "attention_decode: a threshold search did not end");
    });
  }
  return std::make_tuple(call.out, call.stats);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda, CUDA, m) {
  m.impl("attention_forward", TORCH_BOX(&entmax_cuda::attention_forward_cuda));
  m.impl("attention_backward", TORCH_BOX(&entmax_cuda::attention_backward_cuda));
  m.impl("attention_decode", TORCH_BOX(&entmax_cuda::attention_decode_cuda));
}
