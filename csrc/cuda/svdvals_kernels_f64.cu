// Singular-value kernels for double input (svdvals_kernels.cuh).
#include "cuda/svdvals_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVDVALS_KERNELS(double);
}  // namespace rankprune
