// CPU backend of the singular-value ops: one matrix per task of at::parallel_for, the same per-matrix
// arithmetic as the CUDA kernels (core/svdvals_small.h with a SerialGroup).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "core/svdvals_runner.h"
#include "cpu/clones.h"

namespace rankprune {
namespace {

template <typename T, typename scalar_t>
RP_CPU_CLONES void svdvals_range(const BatchView& batch, const MatrixRef& ref, const scalar_t* base,
                                 SvdvalsEpilogue epilogue, double rtol, T* out, int64_t out_stride, int64_t begin,
                                 int64_t end) {
  std::vector<T> work(workspace_size(ref));
  for (int64_t b = begin; b < end; ++b) {
    svdvals_one<T>(SerialGroup{}, base + batch.offset(b), ref, work.data(), epilogue, rtol, out + b * out_stride);
  }
}

}  // namespace

void run_svdvals_cpu(const BatchView& batch, SvdvalsEpilogue epilogue, double rtol, at::Tensor& out) {
  const MatrixRef ref = orient(batch.m, batch.n, batch.sm, batch.sn);
  const int64_t out_stride = epilogue == SvdvalsEpilogue::Values ? ref.cols : 1;
  // Enough matrices per task to amortize scheduling: about 2^15 flops of bidiagonalization each.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, ref.rows * ref.cols * ref.cols));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.tensor.scalar_type(), "rankprune_svdvals_cpu", [&] {
    using T = typename ComputeType<scalar_t>::type;
    const scalar_t* base = batch.tensor.const_data_ptr<scalar_t>();
    T* out_ptr = out.data_ptr<T>();
    at::parallel_for(0, batch.count, grain, [&](int64_t begin, int64_t end) {
      svdvals_range<T>(batch, ref, base, epilogue, rtol, out_ptr, out_stride, begin, end);
    });
  });
}

}  // namespace rankprune
