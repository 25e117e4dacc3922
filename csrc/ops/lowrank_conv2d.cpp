// lowrank_conv2d host side: argument checks for every backend, then the CPU kernel (two ATen convolutions)
// or the CUDA backend (csrc/cuda/lowrank_conv_cuda.cu: fused kernel with a cuDNN fallback).
#include <torch/library.h>

#include "core/checks.h"
#include "core/lowrank_conv.h"

namespace rankprune {
namespace {

std::array<int64_t, 2> pair_arg(c10::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, "rankprune.lowrank_conv2d: ", name, " must have 2 values, got ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, "rankprune.lowrank_conv2d: ", name, " must be >= ",
              min_value, ", got ", v);
  return {v[0], v[1]};
}

LowrankConvArgs check_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                           const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  constexpr const char* op = "lowrank_conv2d";
  TORCH_CHECK(x.dim() == 4, "rankprune.lowrank_conv2d: x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(w1.dim() == 4, "rankprune.lowrank_conv2d: w1 must be [r, C, kh, kw], got shape ", w1.sizes());
  TORCH_CHECK(w2.dim() == 4 && w2.size(2) == 1 && w2.size(3) == 1,
              "rankprune.lowrank_conv2d: w2 must be [N, r, 1, 1], got shape ", w2.sizes());
  check_float_input(x, op, "x");
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "rankprune.lowrank_conv2d: x, w1 and w2 must have one dtype, got ", x.scalar_type(), ", ",
              w1.scalar_type(), " and ", w2.scalar_type());
  TORCH_CHECK(w1.device() == x.device() && w2.device() == x.device(),
              "rankprune.lowrank_conv2d: x, w1 and w2 must be on one device, got ", x.device(), ", ", w1.device(),
              " and ", w2.device());
  TORCH_CHECK(w1.size(1) == x.size(1), "rankprune.lowrank_conv2d: w1 has ", w1.size(1),
              " input channels but x has ", x.size(1));
  TORCH_CHECK(w2.size(1) == w1.size(0), "rankprune.lowrank_conv2d: w2 takes ", w2.size(1),
              " channels but w1 gives r = ", w1.size(0));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w2.size(0), "rankprune.lowrank_conv2d: bias must be [N] = [",
                w2.size(0), "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "rankprune.lowrank_conv2d: bias must have the dtype and device of x");
  }
  LowrankConvArgs a{pair_arg(stride, "stride", 1), pair_arg(padding, "padding", 0), pair_arg(dilation, "dilation", 1)};
  for (int d = 0; d < 2; ++d) {
    const int64_t size = conv_out_size(x.size(2 + d), w1.size(2 + d), a.stride[d], a.padding[d], a.dilation[d]);
    TORCH_CHECK(size > 0, "rankprune.lowrank_conv2d: the kernel (", w1.size(2), "x", w1.size(3), ", dilation ",
                dilation, ") is larger than the padded input (", x.size(2), "x", x.size(3), ", padding ", padding,
                ")");
  }
  return a;
}

at::Tensor lowrank_conv2d_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                              const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const LowrankConvArgs a = check_args(x, w1, w2, bias, stride, padding, dilation);
  return lowrank_conv2d_unfused(x, w1, w2, bias, a);
}

#ifdef RANKPRUNE_WITH_CUDA
at::Tensor lowrank_conv2d_cuda_entry(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                     const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const LowrankConvArgs a = check_args(x, w1, w2, bias, stride, padding, dilation);
  return lowrank_conv2d_cuda(x, w1, w2, bias, a);
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(rankprune, CPU, m) { m.impl("lowrank_conv2d", &lowrank_conv2d_cpu); }

#ifdef RANKPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(rankprune, CUDA, m) { m.impl("lowrank_conv2d", &lowrank_conv2d_cuda_entry); }
#endif

}  // namespace rankprune
