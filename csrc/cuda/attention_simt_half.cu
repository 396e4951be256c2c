// The SIMT attention kernels for float16 and bfloat16 (attention_fwd_kernel.cuh,
// attention_bwd_kernel.cuh): sm_75 bfloat16, tiles too large for shared memory on the
// tensor-core path, ENTMAX_ATTENTION_PATH=simt.
#include "attention_launch.cuh"

namespace entmax_cuda {
namespace attention_cuda {
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<__half>)
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<__nv_bfloat16>)
}  // namespace attention_cuda
}  // namespace entmax_cuda
