// svdvals, nuclear_norm, feature_energy, feature_rank: one host-side implementation for every backend;
// the per-matrix work runs in csrc/cpu/svdvals_cpu.cpp or csrc/cuda/svdvals_cuda.cu.
#include <torch/library.h>

#include "core/checks.h"
#include "core/svdvals_runner.h"

namespace rankprune {
namespace {

void run(const BatchView& batch, SvdvalsEpilogue epilogue, double rtol, at::Tensor& out) {
  if (batch.count == 0 || out.numel() == 0) return;
#ifdef RANKPRUNE_WITH_CUDA
  if (batch.tensor.is_cuda()) return run_svdvals_cuda(batch, epilogue, rtol, out);
#endif
  TORCH_CHECK(batch.tensor.is_cpu(), "rankprune: no kernel for device ", batch.tensor.device(),
              " in this build (CUDA kernels built: ",
#ifdef RANKPRUNE_WITH_CUDA
              "yes",
#else
              "no",
#endif
              ")");
  run_svdvals_cpu(batch, epilogue, rtol, out);
}

// The nuclear norm or rank of every map of x [N, C, H, W] as an [N, C] tensor.
at::Tensor per_map(const at::Tensor& x, SvdvalsEpilogue epilogue, double rtol) {
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options().dtype(real_result_type(x.scalar_type())));
  if (x.size(2) == 0 || x.size(3) == 0) return out.zero_();
  run(make_batch_view(x), epilogue, rtol, out);
  return out;
}

at::Tensor reduce_over_images(const at::Tensor& per_image, c10::string_view reduction, const char* op) {
  if (reduction == "none") return per_image;
  if (reduction == "sum") return per_image.sum(0);
  if (reduction == "mean") return per_image.mean(0);
  TORCH_CHECK(false, "rankprune.", op, ": reduction must be 'none', 'sum' or 'mean', got '", std::string(reduction),
              "'");
}

void check_reduction(c10::string_view reduction, const char* op) {
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "mean", "rankprune.", op,
              ": reduction must be 'none', 'sum' or 'mean', got '", std::string(reduction), "'");
}

}  // namespace

at::Tensor svdvals(const at::Tensor& A) {
  check_matrix_batch(A, "svdvals");
  const int64_t k = std::min(A.size(-2), A.size(-1));
  auto shape = A.sizes().vec();
  shape.pop_back();
  shape.back() = k;
  at::Tensor out = at::empty(shape, A.options().dtype(real_result_type(A.scalar_type())));
  run(make_batch_view(A), SvdvalsEpilogue::Values, -1.0, out);
  return out;
}

at::Tensor nuclear_norm(const at::Tensor& A) {
  check_matrix_batch(A, "nuclear_norm");
  auto shape = A.sizes().vec();
  shape.resize(shape.size() - 2);
  at::Tensor out = at::empty(shape, A.options().dtype(real_result_type(A.scalar_type())));
  if (A.size(-1) == 0 || A.size(-2) == 0) return out.zero_();
  run(make_batch_view(A), SvdvalsEpilogue::Nuclear, -1.0, out);
  return out;
}

at::Tensor feature_energy(const at::Tensor& x, c10::string_view reduction) {
  check_feature_maps(x, "feature_energy");
  check_reduction(reduction, "feature_energy");
  return reduce_over_images(per_map(x, SvdvalsEpilogue::Nuclear, -1.0), reduction, "feature_energy");
}

at::Tensor feature_rank(const at::Tensor& x, std::optional<double> rtol, c10::string_view reduction) {
  check_feature_maps(x, "feature_rank");
  check_reduction(reduction, "feature_rank");
  TORCH_CHECK(!rtol.has_value() || *rtol >= 0.0, "rankprune.feature_rank: rtol must be >= 0, got ", rtol.value_or(0));
  return reduce_over_images(per_map(x, SvdvalsEpilogue::Rank, rtol.value_or(-1.0)), reduction, "feature_rank");
}

TORCH_LIBRARY_IMPL(rankprune, CPU, m) {
  m.impl("svdvals", &svdvals);
  m.impl("nuclear_norm", &nuclear_norm);
  m.impl("feature_energy", &feature_energy);
  m.impl("feature_rank", &feature_rank);
}

#ifdef RANKPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(rankprune, CUDA, m) {
  m.impl("svdvals", &svdvals);
  m.impl("nuclear_norm", &nuclear_norm);
  m.impl("feature_energy", &feature_energy);
  m.impl("feature_rank", &feature_rank);
}
#endif

}  // namespace rankprune
