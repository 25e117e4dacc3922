// The fused lowrank_conv2d kernel for __half operands, every rank (lowrank_conv_kernels.cuh).
#include "cuda/lowrank_conv_kernels.cuh"

namespace rankprune {
RANKPRUNE_INSTANTIATE_FUSED_LOWRANK_CONV(__half);
}  // namespace rankprune
