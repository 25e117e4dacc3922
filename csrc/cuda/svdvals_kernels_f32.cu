// Singular-value kernels for float input (svdvals_kernels.cuh).
#include "cuda/svdvals_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVDVALS_KERNELS(float);
}  // namespace rankprune
