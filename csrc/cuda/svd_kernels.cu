// CUDA kernels of svd / orthonormalize: one thread block per matrix (its warps rotate disjoint column pairs of
// the Jacobi SVD, or update disjoint columns in the Householder QR), every matrix of the batch in one launch.
// The per-matrix arithmetic is core/svd_small.h, the same code the CPU backend runs with a SerialGroup.
// No ATen header here (see launch.h): the host side is svd_cuda.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/launch.h"
#include "cuda/svd_kernels.h"

namespace rankprune {
namespace {

template <typename T, typename scalar_t, typename out_t>
__global__ void svd_kernel(const scalar_t* base, BatchOffsets where, MatrixRef ref, int64_t count, out_t* left,
                           out_t* sigma, out_t* right, T* global_work, int64_t slots) {
  extern __shared__ double smem[];
  const BlockGroup g{smem};
  const Teams<WarpGroup> tm{WarpGroup{static_cast<int>(threadIdx.x & 31)}, static_cast<int>(threadIdx.x >> 5),
                            static_cast<int>(blockDim.x >> 5)};
  T* work = global_work != nullptr ? global_work + blockIdx.x * slots : reinterpret_cast<T*>(smem + kSvdScratchDoubles);
  int* iwork = reinterpret_cast<int*>(work + svd_workspace_size(ref.rows, ref.cols));
  const int64_t rows = ref.rows, cols = ref.cols;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    svd_one<T>(g, tm, base + where.offset(b), ref, work, iwork, left + b * rows * cols, sigma + b * cols,
               right + b * cols * cols);
    __syncthreads();  // the next matrix reuses the workspace
  }
}

template <typename T, typename scalar_t, typename out_t>
__global__ void qr_kernel(const scalar_t* base, BatchOffsets where, MatrixRef ref, int64_t count, out_t* q, out_t* r,
                          T* global_work, int64_t slots) {
  extern __shared__ double smem[];
  const BlockGroup g{smem};
  const Teams<WarpGroup> tm{WarpGroup{static_cast<int>(threadIdx.x & 31)}, static_cast<int>(threadIdx.x >> 5),
                            static_cast<int>(blockDim.x >> 5)};
  T* work = global_work != nullptr ? global_work + blockIdx.x * slots : reinterpret_cast<T*>(smem + kSvdScratchDoubles);
  const int64_t m = ref.rows, k = ref.cols;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    householder_qr_one<T>(g, tm, base + where.offset(b), ref, work, q + b * m * k, r == nullptr ? r : r + b * k * k);
    __syncthreads();
  }
}

}  // namespace

template <typename scalar_t>
void launch_svd_kernel(const KernelLaunch& l, const scalar_t* base, BatchOffsets where, MatrixRef ref, int64_t count,
                       typename ComputeType<scalar_t>::type* left, typename ComputeType<scalar_t>::type* sigma,
                       typename ComputeType<scalar_t>::type* right, svd_compute_t* global_work, int64_t slots) {
  using out_t = typename ComputeType<scalar_t>::type;
  auto kernel = svd_kernel<svd_compute_t, scalar_t, out_t>;
  allow_dynamic_shared_memory(kernel, l.smem);
  kernel<<<l.grid, l.threads, l.smem, l.stream>>>(base, where, ref, count, left, sigma, right, global_work, slots);
  check_kernel_launch();
}

template <typename scalar_t>
void launch_qr_kernel(const KernelLaunch& l, const scalar_t* base, BatchOffsets where, MatrixRef ref, int64_t count,
                      typename ComputeType<scalar_t>::type* q, typename ComputeType<scalar_t>::type* r,
                      typename ComputeType<scalar_t>::type* global_work, int64_t slots) {
  using T = typename ComputeType<scalar_t>::type;
  auto kernel = qr_kernel<T, scalar_t, T>;
  allow_dynamic_shared_memory(kernel, l.smem);
  kernel<<<l.grid, l.threads, l.smem, l.stream>>>(base, where, ref, count, q, r, global_work, slots);
  check_kernel_launch();
}

template void launch_svd_kernel<float>(const KernelLaunch&, const float*, BatchOffsets, MatrixRef, int64_t, float*,
                                       float*, float*, svd_compute_t*, int64_t);
template void launch_svd_kernel<double>(const KernelLaunch&, const double*, BatchOffsets, MatrixRef, int64_t, double*,
                                        double*, double*, svd_compute_t*, int64_t);
template void launch_svd_kernel<c10::Half>(const KernelLaunch&, const c10::Half*, BatchOffsets, MatrixRef, int64_t,
                                           float*, float*, float*, svd_compute_t*, int64_t);
template void launch_svd_kernel<c10::BFloat16>(const KernelLaunch&, const c10::BFloat16*, BatchOffsets, MatrixRef,
                                               int64_t, float*, float*, float*, svd_compute_t*, int64_t);
template void launch_qr_kernel<float>(const KernelLaunch&, const float*, BatchOffsets, MatrixRef, int64_t, float*,
                                      float*, float*, int64_t);
template void launch_qr_kernel<double>(const KernelLaunch&, const double*, BatchOffsets, MatrixRef, int64_t, double*,
                                       double*, double*, int64_t);
template void launch_qr_kernel<c10::Half>(const KernelLaunch&, const c10::Half*, BatchOffsets, MatrixRef, int64_t,
                                          float*, float*, float*, int64_t);
template void launch_qr_kernel<c10::BFloat16>(const KernelLaunch&, const c10::BFloat16*, BatchOffsets, MatrixRef,
                                              int64_t, float*, float*, float*, int64_t);

}  // namespace rankprune
