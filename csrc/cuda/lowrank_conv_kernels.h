// The fused lowrank_conv2d kernel (lowrank_conv_kernels.cu) as the host side (lowrank_conv_cuda.cpp) calls it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace rankprune {

constexpr int kBM = 64;       // output pixels per CTA
constexpr int kBN = 64;       // output channels per phase-2 chunk
constexpr int kMaxRank = 128;

struct FusedParams {
  const void* x;
  const void* w1;
  const void* w2;
  const void* bias;  // may be null
  void* out;
  int C, H, W, N, R, kh, kw, Ho, Wo;
  int sh, sw, ph, pw, dh, dw;
  int M;          // B * Ho * Wo (checked < 2^31 on the host)
  int K1;         // C * kh * kw, ordered (i, j, c): channels fastest, contiguous for channels_last
  int n_span;     // output channels per blockIdx.y (a multiple of kBN)
  bool pixel_fastest;  // A-tile load order: pixels fastest (NCHW) or channels fastest (channels_last)
  int64_t xs[4], w1s[4], w2s[2], os[4];  // strides in elements
};

// One launch of the kernel for operand type T (__half, __nv_bfloat16 or float) and rank RT * 16 (RT = 1..8),
// a grid of ceil(M / kBM) x n_blocks_y CTAs on `stream`.
template <typename T, int RT>
void launch_fused(const FusedParams& p, int64_t n_blocks_y, cudaStream_t stream);

}  // namespace rankprune
