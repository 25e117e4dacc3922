// CUDA kernels of the singular-value ops: many matrices per launch, each resident on chip and worked on by one
// warp (matrices with at most 32 rows) or one block (larger), running core/svdvals_small.h. Which kernel a
// batch takes is decided on the host (svdvals_cuda.cpp). No ATen header here (see launch.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/launch.h"
#include "cuda/svdvals_kernels.h"

namespace rankprune {
namespace {

template <typename T, typename scalar_t>
__global__ void svdvals_warp_kernel(const scalar_t* __restrict__ base, int64_t count, BatchOffsets where, MatrixRef ref,
                                    SvdvalsEpilogue epilogue, double rtol, T* __restrict__ out, int64_t out_stride,
                                    int64_t ws) {
  extern __shared__ double smem[];
  const int warp = threadIdx.x >> 5;
  const WarpGroup g{static_cast<int>(threadIdx.x & 31)};
  T* work = reinterpret_cast<T*>(smem) + warp * ws;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kSvdvalsWarpsPerBlock + warp; b < count;
       b += static_cast<int64_t>(gridDim.x) * kSvdvalsWarpsPerBlock) {
    svdvals_one<T>(g, base + where.offset(b), ref, work, epilogue, rtol, out + b * out_stride);
    g.sync();  // the next matrix overwrites the workspace
  }
}

template <typename T, typename scalar_t>
__global__ void svdvals_block_kernel(const scalar_t* __restrict__ base, int64_t count, BatchOffsets where, MatrixRef ref,
                                     SvdvalsEpilogue epilogue, double rtol, T* __restrict__ out, int64_t out_stride,
                                     T* global_work, int64_t ws) {
  extern __shared__ double smem[];
  const BlockGroup g{smem};
  T* work = global_work != nullptr ? global_work + static_cast<int64_t>(blockIdx.x) * ws
                                   : reinterpret_cast<T*>(smem + kSvdvalsScratchDoubles);
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    svdvals_one<T>(g, base + where.offset(b), ref, work, epilogue, rtol, out + b * out_stride);
    g.sync();
  }
}

}  // namespace

template <typename scalar_t>
void launch_svdvals_warp_kernel(const KernelLaunch& l, const scalar_t* base, int64_t count, BatchOffsets where,
                                MatrixRef ref, SvdvalsEpilogue epilogue, double rtol,
                                typename ComputeType<scalar_t>::type* out, int64_t out_stride, int64_t ws) {
  auto kernel = svdvals_warp_kernel<typename ComputeType<scalar_t>::type, scalar_t>;
  allow_dynamic_shared_memory(kernel, l.smem);
  kernel<<<l.grid, l.threads, l.smem, l.stream>>>(base, count, where, ref, epilogue, rtol, out, out_stride, ws);
  check_kernel_launch();
}

template <typename scalar_t>
void launch_svdvals_block_kernel(const KernelLaunch& l, const scalar_t* base, int64_t count, BatchOffsets where,
                                 MatrixRef ref, SvdvalsEpilogue epilogue, double rtol,
                                 typename ComputeType<scalar_t>::type* out, int64_t out_stride,
                                 typename ComputeType<scalar_t>::type* global_work, int64_t ws) {
  auto kernel = svdvals_block_kernel<typename ComputeType<scalar_t>::type, scalar_t>;
  // The global-memory workspace leaves only the reduction scratch in shared memory, below the default limit.
  if (global_work == nullptr) allow_dynamic_shared_memory(kernel, l.smem);
  kernel<<<l.grid, l.threads, l.smem, l.stream>>>(base, count, where, ref, epilogue, rtol, out, out_stride,
                                                  global_work, ws);
  check_kernel_launch();
}

template void launch_svdvals_warp_kernel<float>(const KernelLaunch&, const float*, int64_t, BatchOffsets,
    MatrixRef, SvdvalsEpilogue, double, float*, int64_t, int64_t);
template void launch_svdvals_warp_kernel<double>(const KernelLaunch&, const double*, int64_t, BatchOffsets,
    MatrixRef, SvdvalsEpilogue, double, double*, int64_t, int64_t);
template void launch_svdvals_warp_kernel<c10::Half>(const KernelLaunch&, const c10::Half*, int64_t, BatchOffsets,
    MatrixRef, SvdvalsEpilogue, double, float*, int64_t, int64_t);
template void launch_svdvals_warp_kernel<c10::BFloat16>(const KernelLaunch&, const c10::BFloat16*, int64_t,
    BatchOffsets, MatrixRef, SvdvalsEpilogue, double, float*, int64_t, int64_t);
template void launch_svdvals_block_kernel<float>(const KernelLaunch&, const float*, int64_t, BatchOffsets,
    MatrixRef, SvdvalsEpilogue, double, float*, int64_t, float*, int64_t);
template void launch_svdvals_block_kernel<double>(const KernelLaunch&, const double*, int64_t, BatchOffsets,
    MatrixRef, SvdvalsEpilogue, double, double*, int64_t, double*, int64_t);
template void launch_svdvals_block_kernel<c10::Half>(const KernelLaunch&, const c10::Half*, int64_t, BatchOffsets,
    MatrixRef, SvdvalsEpilogue, double, float*, int64_t, float*, int64_t);
template void launch_svdvals_block_kernel<c10::BFloat16>(const KernelLaunch&, const c10::BFloat16*, int64_t,
    BatchOffsets, MatrixRef, SvdvalsEpilogue, double, float*, int64_t, float*, int64_t);

}  // namespace rankprune
