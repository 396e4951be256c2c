// The SIMT attention kernels, every dtype (attention_kernels.cuh).
#include "attention_launch.cuh"

namespace entmax_cuda {
namespace attention_cuda {
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<float>)
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<double>)
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<__half>)
ENTMAX_ATTENTION_INSTANTIATE(, SimtGemm<__nv_bfloat16>)
}  // namespace attention_cuda
}  // namespace entmax_cuda
