// CPU backend of svd / orthonormalize: one matrix per task of at::parallel_for, the same per-matrix
// arithmetic as the CUDA kernels (core/svd_small.h with a SerialGroup).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "core/svd_runner.h"
#include "cpu/clones.h"

namespace rankprune {
namespace {

template <typename T, typename scalar_t, typename out_t>
RP_CPU_CLONES void svd_range(const BatchOffsets& where, const MatrixRef& ref, const scalar_t* base, out_t* left,
                             out_t* sigma, out_t* right, int64_t begin, int64_t end) {
  std::vector<T> work(svd_workspace_size(ref.rows, ref.cols));
  std::vector<int> iwork(svd_workspace_ints(ref.cols));
  const Teams<SerialGroup> tm{SerialGroup{}, 0, 1};
  for (int64_t b = begin; b < end; ++b) {
    svd_one<T>(SerialGroup{}, tm, base + where.offset(b), ref, work.data(), iwork.data(), left + b * ref.rows * ref.cols,
               sigma + b * ref.cols, right + b * ref.cols * ref.cols);
  }
}

template <typename T, typename scalar_t>
RP_CPU_CLONES void qr_range(const BatchOffsets& where, const MatrixRef& ref, const scalar_t* base, T* q, T* r,
                            int64_t begin, int64_t end) {
  std::vector<T> work(qr_workspace_size(ref.rows, ref.cols));
  const Teams<SerialGroup> tm{SerialGroup{}, 0, 1};
  const int64_t k = ref.cols;
  for (int64_t b = begin; b < end; ++b) {
    householder_qr_one<T>(SerialGroup{}, tm, base + where.offset(b), ref, work.data(), q + b * ref.rows * k,
                          r == nullptr ? r : r + b * k * k);
  }
}

// Matrices per task: about 2^16 flops each way (Jacobi ~ 6 rows cols^2 per sweep, QR ~ 4 rows cols^2).
int64_t grain_for(int64_t rows, int64_t cols) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 4 * rows * cols * cols));
}

}  // namespace

void run_svd_small_cpu(const BatchView& batch, at::Tensor& left, at::Tensor& sigma, at::Tensor& right) {
  const MatrixRef ref = orient(batch.m, batch.n, batch.sm, batch.sn);
  const BatchOffsets where = batch.offsets();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.tensor.scalar_type(), "rankprune_svd_cpu", [&] {
    using out_t = typename ComputeType<scalar_t>::type;
    const scalar_t* base = batch.tensor.const_data_ptr<scalar_t>();
    out_t* l = left.data_ptr<out_t>();
    out_t* s = sigma.data_ptr<out_t>();
    out_t* r = right.data_ptr<out_t>();
    at::parallel_for(0, batch.count, grain_for(ref.rows, ref.cols), [&](int64_t begin, int64_t end) {
      svd_range<svd_compute_t>(where, ref, base, l, s, r, begin, end);
    });
  });
}

void run_householder_qr_cpu(const BatchView& batch, at::Tensor& q, at::Tensor& r) {
  const MatrixRef ref{batch.m, batch.n, batch.sm, batch.sn};
  const BatchOffsets where = batch.offsets();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.tensor.scalar_type(), "rankprune_qr_cpu", [&] {
    using T = typename ComputeType<scalar_t>::type;
    const scalar_t* base = batch.tensor.const_data_ptr<scalar_t>();
    T* qp = q.data_ptr<T>();
    T* rp = r.defined() ? r.data_ptr<T>() : nullptr;
    at::parallel_for(0, batch.count, grain_for(ref.rows, ref.cols), [&](int64_t begin, int64_t end) {
      qr_range<T>(where, ref, base, qp, rp, begin, end);
    });
  });
}

}  // namespace rankprune
