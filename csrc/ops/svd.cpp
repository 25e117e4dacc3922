// svd, orthonormalize, energy_rank: one host-side implementation for every backend; the per-matrix work
// runs in csrc/cpu/svd_cpu.cpp or csrc/cuda/svd_cuda.cu.
//
// svd paths:
//   - direct: one-sided Jacobi on the whole matrix, oriented so that rows >= cols (core/svd_small.h); on the
//     GPU the matrix sits in shared memory when it fits, else the same kernel works in a global-memory
//     workspace (still one block per matrix, all matrices in one launch);
//   - tall (rows >= 2 cols and more than kDirectMaxElements entries): Householder QR W = Q R on chip, the
//     direct path on the cols x cols R, then U = Q U_R by one batched GEMM. Jacobi then sweeps a square
//     matrix instead of a tall one (its cost per sweep is ~6 rows cols^2 flops), and R fits on chip where W
//     would not (e.g. the 72 x 4608 sketches of svd_lowrank).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "core/checks.h"
#include "core/svd_runner.h"

namespace rankprune {
namespace {

constexpr int64_t kDirectMaxElements = 4096;

const char* cuda_built() {
#ifdef RANKPRUNE_WITH_CUDA
  return "yes";
#else
  return "no";
#endif
}

void run_svd_small(const BatchView& batch, at::Tensor& left, at::Tensor& sigma, at::Tensor& right) {
  if (batch.count == 0) return;
#ifdef RANKPRUNE_WITH_CUDA
  if (batch.tensor.is_cuda()) return run_svd_small_cuda(batch, left, sigma, right);
#endif
  TORCH_CHECK(batch.tensor.is_cpu(), "rankprune.svd: no kernel for device ", batch.tensor.device(),
              " in this build (CUDA kernels built: ", cuda_built(), ")");
  run_svd_small_cpu(batch, left, sigma, right);
}

void run_householder_qr(const BatchView& batch, at::Tensor& q, at::Tensor& r) {
  if (batch.count == 0) return;
#ifdef RANKPRUNE_WITH_CUDA
  if (batch.tensor.is_cuda()) return run_householder_qr_cuda(batch, q, r);
#endif
  TORCH_CHECK(batch.tensor.is_cpu(), "rankprune.orthonormalize: no kernel for device ", batch.tensor.device(),
              " in this build (CUDA kernels built: ", cuda_built(), ")");
  run_householder_qr_cpu(batch, q, r);
}

// The batch dims of A followed by `tail`.
std::vector<int64_t> batch_shape(const at::Tensor& A, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end() - 2);
  shape.insert(shape.end(), tail);
  return shape;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> thin_svd(const at::Tensor& A) {
  check_matrix_batch(A, "svd");
  const int64_t m = A.size(-2), n = A.size(-1), k = std::min(m, n), rows = std::max(m, n);
  const auto opts = A.options().dtype(real_result_type(A.scalar_type()));
  if (k == 0 || A.numel() == 0) {
    return {at::empty(batch_shape(A, {m, k}), opts), at::empty(batch_shape(A, {k}), opts),
            at::empty(batch_shape(A, {n, k}), opts)};
  }
  if (rows >= 2 * k && rows * k > kDirectMaxElements) {
    const bool wide = m < n;
    const at::Tensor W = wide ? A.mT() : A;
    at::Tensor Q = at::empty(batch_shape(A, {rows, k}), opts), R = at::empty(batch_shape(A, {k, k}), opts);
    run_householder_qr(make_batch_view(W), Q, R);
    auto [Ur, S, Vr] = thin_svd(R);
    at::Tensor Uw = at::matmul(Q, Ur);
    if (wide) return std::make_tuple(Vr, S, Uw);
    return std::make_tuple(Uw, S, Vr);
  }
  const BatchView batch = make_batch_view(A);
  const MatrixRef ref = orient(m, n, batch.sm, batch.sn);
  const bool transposed = ref.rows != m || ref.row_stride != batch.sm;
  at::Tensor left = at::empty(batch_shape(A, {ref.rows, k}), opts);
  at::Tensor sigma = at::empty(batch_shape(A, {k}), opts);
  at::Tensor right = at::empty(batch_shape(A, {k, k}), opts);
  run_svd_small(batch, left, sigma, right);
  // The kernel factored the oriented matrix as left diag(sigma) right^T; for A^T that swaps U and V.
  if (transposed) return std::make_tuple(right, sigma, left);
  return std::make_tuple(left, sigma, right);
}

at::Tensor orthonormalize(const at::Tensor& A) {
  check_matrix_batch(A, "orthonormalize");
  const int64_t m = A.size(-2), k = A.size(-1);
  TORCH_CHECK_VALUE(m >= k, "rankprune.orthonormalize: A must be tall ([..., m, k] with m >= k), got shape ",
                    A.sizes());
  at::Tensor Q = at::empty(A.sizes(), A.options().dtype(real_result_type(A.scalar_type())));
  if (Q.numel() == 0) return Q;
  at::Tensor no_r;
  run_householder_qr(make_batch_view(A), Q, no_r);
  return Q;
}

at::Tensor energy_rank(const at::Tensor& S, double energy) {
  TORCH_CHECK_VALUE(S.dim() >= 1, "rankprune.energy_rank: S must hold singular values [..., k], got a 0-d tensor");
  check_float_input(S, "energy_rank", "S");
  TORCH_CHECK_VALUE(energy > 0.0 && energy <= 1.0, "rankprune.energy_rank: energy must be in (0, 1], got ", energy);
  const int64_t k = S.size(-1);
  TORCH_CHECK_VALUE(k >= 1, "rankprune.energy_rank: S must hold at least one singular value, got shape ", S.sizes());
  const at::Tensor kept = S.to(at::kDouble).square().cumsum(-1);
  const at::Tensor total = kept.narrow(-1, k - 1, 1);  // the cumsum's own last entry: energy = 1 gives exact ties
  const at::Tensor r = (kept < total * energy).sum(-1).add_(1).clamp_max_(k);
  // A NaN spectrum keeps every singular value rather than pretending to a low rank.
  return at::where(total.squeeze(-1).isnan(), at::full_like(r, k), r);
}

TORCH_LIBRARY_IMPL(rankprune, CPU, m) {
  m.impl("svd", &thin_svd);
  m.impl("orthonormalize", &orthonormalize);
  m.impl("energy_rank", &energy_rank);
}

#ifdef RANKPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(rankprune, CUDA, m) {
  m.impl("svd", &thin_svd);
  m.impl("orthonormalize", &orthonormalize);
  m.impl("energy_rank", &energy_rank);
}
#endif

}  // namespace rankprune
