// The CUDA kernels of svd / orthonormalize (svd_kernels.cu), as the host side (svd_cuda.cpp) calls them: one
// launch each, on `l.stream`, with the grid, block and dynamic shared memory of `l`; instantiated for float,
// double, c10::Half and c10::BFloat16.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/batch_offsets.h"
#include "core/svd_small.h"

namespace rankprune {

constexpr int kSvdScratchDoubles = 32;  // BlockGroup's reduction scratch, at the start of shared memory

struct KernelLaunch {
  unsigned grid;
  int threads;
  size_t smem;  // dynamic shared memory bytes
  cudaStream_t stream;
};

// svd_one over the batch; global_work is null when the workspace is in shared memory.
template <typename scalar_t>
void launch_svd_kernel(const KernelLaunch& l, const scalar_t* base, BatchOffsets where, MatrixRef ref, int64_t count,
                       typename ComputeType<scalar_t>::type* left, typename ComputeType<scalar_t>::type* sigma,
                       typename ComputeType<scalar_t>::type* right, svd_compute_t* global_work, int64_t slots);

// householder_qr_one over the batch; r may be null, global_work is null when the workspace is in shared memory.
template <typename scalar_t>
void launch_qr_kernel(const KernelLaunch& l, const scalar_t* base, BatchOffsets where, MatrixRef ref, int64_t count,
                      typename ComputeType<scalar_t>::type* q, typename ComputeType<scalar_t>::type* r,
                      typename ComputeType<scalar_t>::type* global_work, int64_t slots);

}  // namespace rankprune
