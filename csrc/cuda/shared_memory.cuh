#pragma once
// Opting CUDA kernels in to more than the default 48 KiB of shared memory per block.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace rankprune {

// The default 48 KiB per block covers a kernel's static *and* dynamic shared memory together, so a launch whose
// dynamic request plus the kernel's static tables (cudaFuncAttributes::sharedSizeBytes) exceeds 48 KiB fails
// with "invalid argument" unless cudaFuncAttributeMaxDynamicSharedMemorySize was raised first. The attribute
// belongs to the kernel on one device: its static size is queried and the attribute raised once per
// (kernel, device), and raised again only when a launch asks for more than before; a driver call on every
// launch would cost more than a small kernel itself. Call on the launching device.
inline void allow_dynamic_shared_memory(const void* kernel, size_t bytes) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  static std::mutex mutex;
  // (kernel, device) -> the dynamic shared memory a launch may use without raising the attribute.
  static std::map<std::pair<const void*, int>, size_t> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, static_cast<int>(c10::cuda::current_device()));
  auto it = allowed.find(key);
  if (it == allowed.end()) {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const size_t static_bytes = attributes.sharedSizeBytes;
    it = allowed.emplace(key, static_bytes < kDefaultLimit ? kDefaultLimit - static_bytes : 0).first;
  }
  if (bytes > it->second) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    it->second = bytes;
  }
}

template <typename... Args>
void allow_dynamic_shared_memory(void (*kernel)(Args...), size_t bytes) {
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace rankprune
