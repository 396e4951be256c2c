// The dynamic shared-memory limit of a kernel, raised once per (kernel, device).
//
// cudaFuncAttributeMaxDynamicSharedMemorySize is a process-wide attribute of the kernel. Set
// per launch to that launch's size, a host thread launching with more could find it lowered
// by another thread between its own set and its launch (cudaErrorInvalidValue). So it is set
// once, to the most any launch can have on the device (the opt-in limit less the kernel's
// static shared memory), under a lock; a launch still gets only the shared memory it asks for.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <utility>

namespace entmax_cuda {

inline cudaError_t allow_max_dynamic_smem(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> raised;  // (kernel, device)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  if (raised.count({kernel, device}) != 0) return cudaSuccess;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attributes{};
  err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             optin - static_cast<int>(attributes.sharedSizeBytes));
  if (err == cudaSuccess) raised.insert({kernel, device});
  return err;
}

}  // namespace entmax_cuda
