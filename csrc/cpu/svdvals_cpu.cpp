// CPU backend of the singular-value ops. Matrices up to kLanesMaxRows rows (values and nuclear norms) go
// kLanes at a time through cpu/svdvals_lanes.h, one matrix per SIMD lane; the others, the Rank epilogue and
// batches smaller than kLanes run one matrix per task with the per-matrix arithmetic of the CUDA kernels
// (core/svdvals_small.h with a SerialGroup). Both compute the same algorithm, lane by lane.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "core/svdvals_runner.h"
#include "cpu/clones.h"
#include "cpu/svdvals_lanes.h"

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

// Above 64 rows the interleaved workspace (64 x 64 x 32 bytes = 128 KiB) leaves L2 and the per-matrix code,
// whose columns are then long vectors, is as fast (measured at 56 x 56: lanes 1.9x faster in float, 1.3x in
// double; at 14 x 14: 3.4x and 2.3x).
constexpr int64_t kLanesMaxRows = 64;

// Groups [begin, end) of kLanes consecutive matrices; the last group of the batch may be partial: its empty
// lanes repeat its last matrix and write to a scratch buffer.
template <typename T, typename scalar_t>
RP_CPU_CLONES void svdvals_lanes_range(const BatchView& batch, const MatrixRef& ref, const scalar_t* base,
                                       SvdvalsEpilogue epilogue, T* out, int64_t out_stride, int64_t begin,
                                       int64_t end) {
  constexpr int kLanes = LaneVec<T>::kLanes;
  // The vectors need 32-byte alignment; std::vector<V> gave 16-byte-aligned memory in this build (an
  // aligned-store fault), so the workspace is a buffer of T with its start rounded up.
  using V = typename LaneVec<T>::V;
  std::vector<T> buffer((lanes_workspace_size<T>(ref) + 1) * kLanes);
  V* work = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(buffer.data()) + sizeof(V) - 1) & ~(sizeof(V) - 1));
  std::vector<T> partial(kLanes * out_stride);
  for (int64_t group = begin; group < end; ++group) {
    const int64_t first = group * kLanes, count = std::min<int64_t>(kLanes, batch.count - first);
    const scalar_t* bases[kLanes];
    for (int l = 0; l < kLanes; ++l) bases[l] = base + batch.offset(first + std::min<int64_t>(l, count - 1));
    T* dest = count == kLanes ? out + first * out_stride : partial.data();
    svdvals_lanes<T>(bases, ref, work, epilogue, dest, out_stride);
    if (count < kLanes) std::copy(partial.begin(), partial.begin() + count * out_stride, out + first * out_stride);
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
    constexpr int64_t kLanes = LaneVec<T>::kLanes;
    if (epilogue != SvdvalsEpilogue::Rank && ref.rows <= kLanesMaxRows && ref.cols > 0 && batch.count >= kLanes) {
      const int64_t groups = (batch.count + kLanes - 1) / kLanes;
      at::parallel_for(0, groups, (grain + kLanes - 1) / kLanes, [&](int64_t begin, int64_t end) {
        svdvals_lanes_range<T>(batch, ref, base, epilogue, out_ptr, out_stride, begin, end);
      });
      return;
    }
    at::parallel_for(0, batch.count, grain, [&](int64_t begin, int64_t end) {
      svdvals_range<T>(batch, ref, base, epilogue, rtol, out_ptr, out_stride, begin, end);
    });
  });
}

}  // namespace rankprune
