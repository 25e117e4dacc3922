// svd / orthonormalize kernels for c10::BFloat16 input (svd_kernels.cuh).
#include <c10/util/BFloat16.h>

#include "cuda/svd_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVD_KERNELS(c10::BFloat16);
}  // namespace rankprune
