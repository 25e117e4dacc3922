// CUDA backend of the singular-value ops, host side (the kernels are in svdvals_kernels.cu): many matrices per
// launch, each resident on chip and worked on by one warp (matrices with at most 32 rows) or one block (larger),
// running core/svdvals_small.h.
//
// Paths, by the per-matrix workspace (about rows * cols values of the compute type):
//   - warp path: rows <= 32, kWarpsPerBlock matrices per block, workspaces in shared memory;
//   - block path: the workspace in shared memory while it fits the device's opt-in limit
//     (fp32 up to about 220 x 220 on H100/H200);
//   - global path: beyond that, the same block kernel with the workspace in global memory (one slice per
//     resident block, reused across the grid-stride loop). Still one launch for the whole batch.
// No host synchronisation, no per-matrix library calls.
//
// What each lane does (core/svdvals_small.h): the load is strided over the group's lanes in column-major
// order (consecutive lanes read consecutive rows, the smaller stride: coalesced); the bidiagonalization gives
// each lane whole columns (left reflectors) or whole rows (right reflectors), with a group reduction per
// reflector; the singular values: first a grid of 32 Sturm probes, one per lane, then one lane per singular
// value running its own search (6-9 passes of 2n divisions; lanes diverge only in their number of passes);
// one lane restores the descending order (linear on nearly sorted values) for the Values epilogue. The Rank
// epilogue needs sigma_max and one Sturm count, which every lane computes redundantly (no broadcast).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/svdvals_runner.h"
#include "cuda/svdvals_kernels.h"

namespace rankprune {
namespace {

// Threads per matrix on the block path: enough for one row or column each in the Householder updates.
int block_threads(int64_t rows) { return rows <= 64 ? 64 : rows <= 128 ? 128 : 256; }

}  // namespace

void run_svdvals_cuda(const BatchView& batch, SvdvalsEpilogue epilogue, double rtol, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(batch.tensor.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const MatrixRef ref = orient(batch.m, batch.n, batch.sm, batch.sn);
  const int64_t out_stride = epilogue == SvdvalsEpilogue::Values ? ref.cols : 1;
  const BatchOffsets where = batch.offsets();
  const int64_t ws = workspace_size(ref);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.tensor.scalar_type(), "rankprune_svdvals_cuda", [&] {
    using T = typename ComputeType<scalar_t>::type;
    const scalar_t* base = batch.tensor.const_data_ptr<scalar_t>();
    T* out_ptr = out.data_ptr<T>();
    if (ref.rows <= 32) {
      const size_t bytes = static_cast<size_t>(kSvdvalsWarpsPerBlock * ws) * sizeof(T);
      const int64_t blocks = std::min<int64_t>((batch.count + kSvdvalsWarpsPerBlock - 1) / kSvdvalsWarpsPerBlock,
                                               static_cast<int64_t>(prop->multiProcessorCount) * 64);
      launch_svdvals_warp_kernel<scalar_t>({static_cast<unsigned>(blocks), kSvdvalsWarpsPerBlock * 32, bytes, stream},
                                           base, batch.count, where, ref, epilogue, rtol, out_ptr, out_stride, ws);
      return;
    }
    const int threads = block_threads(ref.rows);
    const size_t smem_bytes = kSvdvalsScratchDoubles * sizeof(double) + static_cast<size_t>(ws) * sizeof(T);
    if (smem_bytes <= prop->sharedMemPerBlockOptin) {
      const int64_t blocks = std::min<int64_t>(batch.count, static_cast<int64_t>(prop->multiProcessorCount) * 32);
      launch_svdvals_block_kernel<scalar_t>({static_cast<unsigned>(blocks), threads, smem_bytes, stream}, base,
                                            batch.count, where, ref, epilogue, rtol, out_ptr, out_stride, nullptr, ws);
    } else {
      // Workspace in global memory: a few resident blocks per SM, each reusing its slice.
      const int64_t blocks = std::min<int64_t>(batch.count, static_cast<int64_t>(prop->multiProcessorCount) * 4);
      at::Tensor work = at::empty({blocks * ws}, out.options().dtype(c10::CppTypeToScalarType<T>::value));
      launch_svdvals_block_kernel<scalar_t>(
          {static_cast<unsigned>(blocks), threads, kSvdvalsScratchDoubles * sizeof(double), stream}, base,
          batch.count, where, ref, epilogue, rtol, out_ptr, out_stride, work.data_ptr<T>(), ws);
    }
  });
}

}  // namespace rankprune
