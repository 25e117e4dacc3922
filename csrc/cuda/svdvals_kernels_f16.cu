// Singular-value kernels for c10::Half input (svdvals_kernels.cuh).
#include <c10/util/Half.h>

#include "cuda/svdvals_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_SVDVALS_KERNELS(c10::Half);
}  // namespace rankprune
