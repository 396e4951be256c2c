// The tensor-core attention kernels for float16 (attention_fwd_kernel.cuh, attention_bwd_kernel.cuh).
#include "attention_launch.cuh"

namespace entmax_cuda {
namespace attention_cuda {
ENTMAX_ATTENTION_INSTANTIATE(, TcGemm<__half, 64>)
ENTMAX_ATTENTION_INSTANTIATE(, TcGemm<__half, 128>)
}  // namespace attention_cuda
}  // namespace entmax_cuda
