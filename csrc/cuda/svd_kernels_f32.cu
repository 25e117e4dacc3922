// svd / orthonormalize kernels for float input (svd_kernels.cuh).
#include "cuda/svd_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVD_KERNELS(float);
}  // namespace rankprune
