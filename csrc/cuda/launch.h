// What the CUDA kernel files (csrc/cuda/*.cu) need around a launch, declared without c10's or ATen's headers:
// the kernel files include only the CUDA runtime and csrc/core, because their compile time is mostly the
// parsing of headers (three passes: cudafe++, cicc, the host compiler); the definitions are in launch.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace rankprune {

// Opts a kernel in to more than the default 48 KiB of shared memory per block.
//
// The default 48 KiB per block covers a kernel's static *and* dynamic shared memory together, so a launch whose
// dynamic request plus the kernel's static tables (cudaFuncAttributes::sharedSizeBytes) exceeds 48 KiB fails
// with "invalid argument" unless cudaFuncAttributeMaxDynamicSharedMemorySize was raised first. The attribute
// belongs to the kernel on one device: its static size is queried and the attribute raised once per
// (kernel, device), and raised again only when a launch asks for more than before; a driver call on every
// launch would cost more than a small kernel itself. Call on the launching device.
void allow_dynamic_shared_memory(const void* kernel, size_t bytes);

template <typename... Args>
void allow_dynamic_shared_memory(void (*kernel)(Args...), size_t bytes) {
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
}

// C10_CUDA_KERNEL_LAUNCH_CHECK(): throws torch's error for a failed launch (cudaGetLastError()).
void check_kernel_launch();

}  // namespace rankprune
