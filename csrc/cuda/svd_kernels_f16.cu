// svd / orthonormalize kernels for c10::Half input (svd_kernels.cuh).
#include <c10/util/Half.h>

#include "cuda/svd_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVD_KERNELS(c10::Half);
}  // namespace rankprune
