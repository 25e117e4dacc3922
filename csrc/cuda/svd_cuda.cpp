// CUDA backend of svd / orthonormalize, host side: one thread block per matrix (its warps rotate disjoint column
// pairs of the Jacobi SVD, or update disjoint columns in the Householder QR), every matrix of the batch in one
// launch on the current stream, no host synchronization. The kernels (svd_kernels.cu) run core/svd_small.h,
// the same code the CPU backend runs with a SerialGroup.
//
// Memory: the workspace (matrix, V, vectors) lives in dynamic shared memory when it fits the device's
// opt-in limit (227 KB on H100: e.g. 64 x 64 needs 66 KB in float64, the 72 x 72 R of svd_lowrank 84 KB);
// beyond that the same kernel runs on a global-memory workspace, one slice per resident block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "core/svd_runner.h"
#include "cuda/svd_kernels.h"

namespace rankprune {
namespace {

constexpr int kMaxWarps = 8;

// ints stored after T values, rounded up to whole T slots
template <typename T>
int64_t ints_in_slots(int64_t ints) {
  return (ints * static_cast<int64_t>(sizeof(int)) + static_cast<int64_t>(sizeof(T)) - 1) /
         static_cast<int64_t>(sizeof(T));
}

struct Launch {
  int64_t grid;
  size_t smem;       // dynamic shared memory bytes
  bool global_work;  // workspace in global memory (does not fit shared memory)
};

// Shared memory if the per-matrix workspace fits the opt-in limit, else a global workspace for a grid of a
// few blocks per SM.
Launch plan_launch(int64_t count, int64_t slots_bytes) {
  const int device = at::cuda::current_device();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t scratch = kSvdScratchDoubles * sizeof(double);
  Launch l;
  if (static_cast<int64_t>(scratch) + slots_bytes <= optin) {
    l.global_work = false;
    l.smem = scratch + static_cast<size_t>(slots_bytes);
    l.grid = std::min<int64_t>(count, int64_t{1} << 30);
  } else {
    l.global_work = true;
    l.smem = scratch;
    l.grid = std::min<int64_t>(count, 4 * static_cast<int64_t>(prop->multiProcessorCount));
  }
  return l;
}

}  // namespace

void run_svd_small_cuda(const BatchView& batch, at::Tensor& left, at::Tensor& sigma, at::Tensor& right) {
  using T = svd_compute_t;
  const c10::cuda::CUDAGuard guard(batch.tensor.device());  // launch, stream and properties of its device
  const MatrixRef ref = orient(batch.m, batch.n, batch.sm, batch.sn);
  const int64_t slots = svd_workspace_size(ref.rows, ref.cols) + ints_in_slots<T>(svd_workspace_ints(ref.cols));
  const Launch l = plan_launch(batch.count, slots * static_cast<int64_t>(sizeof(T)));
  // One warp per column pair of a round, at most kMaxWarps.
  const int warps = static_cast<int>(std::clamp<int64_t>((ref.cols + 1) / 2, 1, kMaxWarps));
  at::Tensor work;
  if (l.global_work) work = at::empty({l.grid * slots}, batch.tensor.options().dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.tensor.scalar_type(), "rankprune_svd_cuda", [&] {
    using out_t = typename ComputeType<scalar_t>::type;
    launch_svd_kernel<scalar_t>({static_cast<unsigned>(l.grid), 32 * warps, l.smem, stream},
                                batch.tensor.const_data_ptr<scalar_t>(), batch.offsets(), ref, batch.count,
                                left.data_ptr<out_t>(), sigma.data_ptr<out_t>(), right.data_ptr<out_t>(),
                                l.global_work ? work.data_ptr<T>() : nullptr, slots);
  });
}

void run_householder_qr_cuda(const BatchView& batch, at::Tensor& q, at::Tensor& r) {
  const c10::cuda::CUDAGuard guard(batch.tensor.device());
  const MatrixRef ref{batch.m, batch.n, batch.sm, batch.sn};
  // Row loops use the whole block, column updates one warp per column.
  const int threads = ref.rows * ref.cols > 2048 ? 32 * kMaxWarps : 128;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.tensor.scalar_type(), "rankprune_qr_cuda", [&] {
    using T = typename ComputeType<scalar_t>::type;
    const int64_t slots = qr_workspace_size(ref.rows, ref.cols);
    const Launch l = plan_launch(batch.count, slots * static_cast<int64_t>(sizeof(T)));
    at::Tensor work;
    if (l.global_work) work = at::empty({l.grid * slots}, q.options());
    launch_qr_kernel<scalar_t>({static_cast<unsigned>(l.grid), threads, l.smem, stream},
                               batch.tensor.const_data_ptr<scalar_t>(), batch.offsets(), ref, batch.count,
                               q.data_ptr<T>(), r.defined() ? r.data_ptr<T>() : nullptr,
                               l.global_work ? work.data_ptr<T>() : nullptr, slots);
  });
}

}  // namespace rankprune
