// lowrank_conv2d: conv2d(x, w1 [r, C, kh, kw]) followed by a 1x1 conv2d(., w2 [N, r, 1, 1]) + bias.
// Shared by the host side (csrc/ops/lowrank_conv2d.cpp) and the CUDA backend (csrc/cuda/lowrank_conv_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

namespace rankprune {

struct LowrankConvArgs {
  std::array<int64_t, 2> stride, padding, dilation;
};

// Output spatial size of the first (kh x kw) convolution, which the 1x1 second one keeps.
inline int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// The unfused path (two ATen convolutions, cuDNN on CUDA): the CPU kernel, and the CUDA fallback for shapes
// the fused kernel does not cover. The result keeps the memory format of x.
inline at::Tensor lowrank_conv2d_unfused(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                         const std::optional<at::Tensor>& bias, const LowrankConvArgs& a) {
  at::Tensor mid = at::conv2d(x, w1, std::nullopt, a.stride, a.padding, a.dilation);
  const std::array<int64_t, 2> ones{1, 1}, zeros{0, 0};
  at::Tensor out = at::conv2d(mid, w2, bias, ones, zeros, ones);
  return out.contiguous(x.suggest_memory_format());
}

#ifdef RANKPRUNE_WITH_CUDA
// CUDA backend: lowrank_conv2d_unfused, or the fused kernel where it covers the shape and is forced or, under
// cudnn.benchmark, timed faster for the shape. Arguments are already checked.
at::Tensor lowrank_conv2d_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& bias, const LowrankConvArgs& a);
#endif

}  // namespace rankprune
