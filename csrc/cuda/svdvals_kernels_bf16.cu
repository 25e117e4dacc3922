// Singular-value kernels for c10::BFloat16 input (svdvals_kernels.cuh).
#include <c10/util/BFloat16.h>

#include "cuda/svdvals_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVDVALS_KERNELS(c10::BFloat16);
}  // namespace rankprune
