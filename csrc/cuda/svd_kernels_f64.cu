// svd / orthonormalize kernels for double input (svd_kernels.cuh).
#include "cuda/svd_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVD_KERNELS(double);
}  // namespace rankprune
