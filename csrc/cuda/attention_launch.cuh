// Launch templates of the fused attention kernels (no torch): shared-memory
// sizing, the opt-in attribute, grids. Instantiated per matmul policy in
// attention_simt_*.cu and attention_tc_*.cu, so those compile in parallel; the
// torch-facing launcher (attention_cuda.cu) only declares them.
#pragma once

#include "attention_bwd_kernel.cuh"
#include "attention_decode_kernel.cuh"
#include "attention_fwd_kernel.cuh"
#include "dynamic_smem.cuh"

#include <cuda_runtime.h>

namespace entmax_cuda {
namespace attention_cuda {

template <class Gemm>
size_t rows_smem_bytes(const AttentionParams& p) { return RowsSmem<Gemm>(p.D, p.Dv).total; }

template <class Gemm>
size_t keys_smem_bytes(const AttentionParams& p) { return KeysSmem<Gemm>(p.D, p.Dv).total; }

template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t grid, size_t smem, cudaStream_t stream, const AttentionParams& p) {
  // Above 48 KiB the kernel's limit must be raised first (once per kernel and device: dynamic_smem.cuh).
  if (smem > 48 * 1024) {
    const cudaError_t err = allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Forward: one CTA per (batch, head, query tile); p.bm_shift / p.n_bm and smem from fit_block_maxima
// (attention_params.h).
template <class Gemm>
cudaError_t launch_attention_forward(const AttentionParams& p, size_t smem, cudaStream_t stream) {
  return launch(attention_forward_kernel<Gemm>, p.B * p.Hq * p.nQ, smem, stream, p);
}

// Backward: the row sweep (q_i, alpha-gradient, dQ), then the key sweep (dK, dV)
// on the same stream; p.chunks_v / p.chunks_k from set_chunks<Gemm> (attention_params.h).
template <class Gemm>
cudaError_t launch_attention_backward(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = launch(attention_backward_rows_kernel<Gemm>, p.B * p.Hq * p.nQ, rows_smem_bytes<Gemm>(p),
                           stream, p);
  if (err != cudaSuccess || p.nK == 0) return err;
  return launch(attention_backward_keys_kernel<Gemm>, (p.chunks_v + p.chunks_k) * p.B * p.Hkv * p.nK,
                keys_smem_bytes<Gemm>(p), stream, p);
}

// Explicit instantiation (in the policy's .cu file) or its extern declaration (in the launcher).
#define ENTMAX_ATTENTION_INSTANTIATE(prefix, ...)                                                         \
  prefix template cudaError_t launch_attention_forward<__VA_ARGS__>(const AttentionParams&, size_t,      \
                                                                    cudaStream_t);                       \
  prefix template cudaError_t launch_attention_backward<__VA_ARGS__>(const AttentionParams&, cudaStream_t);

#define ENTMAX_ATTENTION_ALL_POLICIES(prefix)                       \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, SimtGemm<float>)             \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, SimtGemm<double>)            \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, SimtGemm<__half>)            \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, SimtGemm<__nv_bfloat16>)     \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, TcGemm<__half, 64>)          \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, TcGemm<__half, 128>)         \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, TcGemm<__nv_bfloat16, 64>)   \
  ENTMAX_ATTENTION_INSTANTIATE(prefix, TcGemm<__nv_bfloat16, 128>)

// Decoding (attention_decode_kernel.cuh): a pass over every work item, or a merge over
// every row; no opt-in shared memory (DecodeSmem stays below 48 KiB).
template <typename scalar_t>
cudaError_t launch_decode_pass(const AttentionParams& p, const DecodeBuffers<typename Scalar<scalar_t>::acc>& w,
                               int pass, cudaStream_t stream) {
  static_assert(DecodeSmem<typename Scalar<scalar_t>::acc>::bytes <= 48 * 1024, "decode: default shared memory");
  attention_decode_pass_kernel<scalar_t><<<static_cast<unsigned>(w.plan.items()), kThreads,
                                          DecodeSmem<typename Scalar<scalar_t>::acc>::bytes, stream>>>(p, w, pass);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_decode_merge(const AttentionParams& p, const DecodeBuffers<typename Scalar<scalar_t>::acc>& w,
                                int which, cudaStream_t stream) {
  const int64_t blocks = attention::num_tiles(w.plan.rows(), kThreads);
  attention_decode_merge_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, w, which);
  return cudaGetLastError();
}

#define ENTMAX_DECODE_INSTANTIATE(prefix, T)                                                                   \
  prefix template cudaError_t launch_decode_pass<T>(const AttentionParams&,                                    \
                                                    const DecodeBuffers<typename Scalar<T>::acc>&, int,        \
                                                    cudaStream_t);                                             \
  prefix template cudaError_t launch_decode_merge<T>(const AttentionParams&,                                   \
                                                     const DecodeBuffers<typename Scalar<T>::acc>&, int,       \
                                                     cudaStream_t);

#define ENTMAX_DECODE_ALL_TYPES(prefix)          \
  ENTMAX_DECODE_INSTANTIATE(prefix, float)       \
  ENTMAX_DECODE_INSTANTIATE(prefix, double)      \
  ENTMAX_DECODE_INSTANTIATE(prefix, __half)      \
  ENTMAX_DECODE_INSTANTIATE(prefix, __nv_bfloat16)

}  // namespace attention_cuda
}  // namespace entmax_cuda
