// The SIMT attention kernels for float32 and float64 (attention_fwd_kernel.cuh, attention_bwd_kernel.cuh).
#include "attention_launch.cuh"

namespace entmax_cuda {
namespace attention_cuda {
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<float>)
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<double>)
}  // namespace attention_cuda
}  // namespace entmax_cuda
