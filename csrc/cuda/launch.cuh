// Host side of the CUDA launches: return-code checks, the device's attributes (queried
// once per device), compile-time switches, grid sizes and the cluster launch.
#pragma once

#include "../entmax_ops.h"
#include "../entmax_rows.h"
#include "dynamic_smem.cuh"

#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>

// ENTMAX_CUDA_CHECK(call, what): throws (RuntimeError in Python) naming the call and CUDA's error.
#define ENTMAX_CUDA_CHECK(call, what)                                                        \
  do {                                                                                       \
    const cudaError_t entmax_err_ = (call);                                                  \
    ENTMAX_CHECK(entmax_err_ == cudaSuccess, "entmax_cuda: ", what, " failed: ",            \
                 cudaGetErrorString(entmax_err_));                                           \
  } while (0)

// Calls BODY with the compile-time int NAME = BLOCKS (1, 2, 4 or 8: rows::long_row_blocks).
#define ENTMAX_CLUSTER_SWITCH(BLOCKS, NAME, ...) \
  [&] {                                          \
    switch (BLOCKS) {                            \
      case 8: {                                  \
        constexpr int NAME = 8;                  \
        return __VA_ARGS__();                    \
      }                                          \
      case 4: {                                  \
        constexpr int NAME = 4;                  \
        return __VA_ARGS__();                    \
      }                                          \
      case 2: {                                  \
        constexpr int NAME = 2;                  \
        return __VA_ARGS__();                    \
      }                                          \
      default: {                                 \
        constexpr int NAME = 1;                  \
        return __VA_ARGS__();                    \
      }                                          \
    }                                            \
  }()

namespace entmax_cuda {
namespace cuda {
namespace {

// Grid sizes: the kernels loop over rows, so grids are capped at this many blocks.
constexpr int64_t kMaxGridBlocks = 1 << 20;
// Shared memory the long-row kernel keeps for itself beside its dynamic cache (ReduceSlots).
constexpr int kStaticSmemMargin = 8 * 1024;

// The attributes the launchers need, read once per device.
struct DeviceInfo {
  int multiprocessors = 0;
  int max_dynamic_smem = 0;  // opt-in shared memory per block
  bool cluster_launch = false;
};

const DeviceInfo& device_info(int device) {
  static std::once_flag once;
  static int count = 0;
  static std::unique_ptr<std::once_flag[]> device_once;
  static std::unique_ptr<DeviceInfo[]> infos;
  std::call_once(once, [] {
    ENTMAX_CUDA_CHECK(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    device_once.reset(new std::once_flag[count]);
    infos.reset(new DeviceInfo[count]);
  });
  ENTMAX_CHECK(device >= 0 && device < count, "entmax_cuda: no CUDA device ", device);
  std::call_once(device_once[device], [device] {
    DeviceInfo& info = infos[device];
    ENTMAX_CUDA_CHECK(cudaDeviceGetAttribute(&info.multiprocessors, cudaDevAttrMultiProcessorCount, device),
                      "cudaDeviceGetAttribute(multiprocessors)");
    ENTMAX_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_dynamic_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                      "cudaDeviceGetAttribute(shared memory per block)");
    int cluster = 0;
    ENTMAX_CUDA_CHECK(cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, device),
                      "cudaDeviceGetAttribute(cluster launch)");
    info.cluster_launch = cluster != 0;
  });
  return infos[device];
}

int64_t grid_for(int64_t blocks) { return std::min<int64_t>(std::max<int64_t>(blocks, 1), kMaxGridBlocks); }

// Lets `kernel` take `smem` bytes of dynamic shared memory where the default 48 KB is not
// enough (dynamic_smem.cuh: the limit is raised once per kernel and device).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int smem) {
  constexpr int kDefaultDynamicSmem = 48 * 1024;
  if (smem <= kDefaultDynamicSmem) return;
  ENTMAX_CUDA_CHECK(allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel)),
                    "cudaFuncSetAttribute(dynamic shared memory)");
}

// A launch of `grid_blocks` blocks in clusters of `blocks` (no cluster attribute for 1).
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1];
  ClusterLaunch(int64_t grid_blocks, int blocks, int threads, int smem, cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(grid_blocks));
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = blocks;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = blocks > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config points into attribute
};

// Whether `kernel` can run as clusters of `blocks` on `device`: its code must be built for
// sm_90+ (its cluster reductions are compiled out below) and the device must fit at least
// one such cluster with `smem` bytes of dynamic shared memory per block. Asked once per
// kernel, device, cluster size and shared memory size.
template <typename Kernel>
bool cluster_fits(Kernel kernel, int device, int blocks, int smem, int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, int>, bool> known;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, blocks, smem);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  cudaFuncAttributes attributes;
  ENTMAX_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
  bool fits = attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90;
  if (fits) {
    allow_dynamic_smem(kernel, smem);
    ClusterLaunch launch(blocks, blocks, threads, smem, nullptr);
    int clusters = 0;
    ENTMAX_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config),
                      "cudaOccupancyMaxActiveClusters");
    fits = clusters > 0;
  }
  std::lock_guard<std::mutex> lock(mutex);
  known[key] = fits;
  return fits;
}

// Launches `kernel` on grid_rows * blocks blocks, as clusters of `blocks` when blocks > 1.
template <typename... KernelArgs, typename... Args>
void launch_clustered(void (*kernel)(KernelArgs...), int64_t grid_rows, int blocks, int threads, int smem,
                      cudaStream_t stream, Args... args) {
  allow_dynamic_smem(kernel, smem);
  ClusterLaunch launch(grid_rows * blocks, blocks, threads, smem, stream);
  ENTMAX_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, args...), "kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace entmax_cuda
