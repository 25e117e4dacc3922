#pragma once
// Opting CUDA kernels in to more than the default 48 KiB of dynamic shared memory.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace rankprune {

// A launch asking for more than 48 KiB of dynamic shared memory fails unless the kernel's
// cudaFuncAttributeMaxDynamicSharedMemorySize was raised first. The attribute belongs to the kernel on one
// device, so it is raised once per (kernel, device) and again only when a launch asks for more than before;
// a driver call on every launch would cost more than a small kernel itself. Call on the launching device.
inline void allow_dynamic_shared_memory(const void* kernel, size_t bytes) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (bytes <= kDefaultLimit) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = allowed[{kernel, static_cast<int>(c10::cuda::current_device())}];
  if (bytes > current) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    current = bytes;
  }
}

template <typename... Args>
void allow_dynamic_shared_memory(void (*kernel)(Args...), size_t bytes) {
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace rankprune
