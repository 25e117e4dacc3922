// Definitions for csrc/cuda/launch.h, compiled once by the host compiler.
#include "cuda/launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <map>
#include <mutex>
#include <utility>

namespace rankprune {

void allow_dynamic_shared_memory(const void* kernel, size_t bytes) {
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

void check_kernel_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace rankprune
