// The CUDA kernels of the singular-value ops (svdvals_kernels.cu), as the host side (svdvals_cuda.cpp) calls
// them: one launch each, on `l.stream`; instantiated for float, double, c10::Half and c10::BFloat16.
#pragma once

#include "core/batch_offsets.h"
#include "core/svdvals_small.h"
#include "cuda/svd_kernels.h"  // KernelLaunch

namespace rankprune {

constexpr int kSvdvalsWarpsPerBlock = 4;
constexpr int kSvdvalsScratchDoubles = 32;  // BlockGroup reduction scratch: one double per warp

// Warp path: one warp per matrix, kSvdvalsWarpsPerBlock matrices per block, workspaces (ws values of T each)
// in dynamic shared memory.
template <typename scalar_t>
void launch_svdvals_warp_kernel(const KernelLaunch& l, const scalar_t* base, int64_t count, BatchOffsets where,
                                MatrixRef ref, SvdvalsEpilogue epilogue, double rtol,
                                typename ComputeType<scalar_t>::type* out, int64_t out_stride, int64_t ws);

// Block path: one block per matrix, the workspace in dynamic shared memory (global_work null) or in global memory
// (a slice of ws values per block).
template <typename scalar_t>
void launch_svdvals_block_kernel(const KernelLaunch& l, const scalar_t* base, int64_t count, BatchOffsets where,
                                 MatrixRef ref, SvdvalsEpilogue epilogue, double rtol,
                                 typename ComputeType<scalar_t>::type* out, int64_t out_stride,
                                 typename ComputeType<scalar_t>::type* global_work, int64_t ws);

}  // namespace rankprune
