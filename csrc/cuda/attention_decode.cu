// The split-K decoding kernels for every dtype (attention_decode_kernel.cuh).
#include "attention_launch.cuh"

namespace entmax_cuda {
namespace attention_cuda {
ENTMAX_DECODE_ALL_TYPES()
}  // namespace attention_cuda
}  // namespace entmax_cuda
