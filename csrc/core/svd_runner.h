// Backend entry points that run core/svd_small.h over a whole batch (csrc/cpu/svd_cpu.cpp, csrc/cuda/svd_cuda.cu).
#pragma once

#include "core/batch.h"
#include "core/svd_small.h"

namespace rankprune {

// Thin SVD of every matrix of the batch, oriented by orient() (rows >= cols). Outputs contiguous, of the
// compute dtype (float, double for double input): left [count, rows, cols], sigma [count, cols],
// right [count, cols, cols], with matrix b (oriented) = left_b diag(sigma_b) right_b^T.
void run_svd_small_cpu(const BatchView& batch, at::Tensor& left, at::Tensor& sigma, at::Tensor& right);
// Householder QR of every m x k matrix (m >= k) of the batch as it lies (no orientation): q [count, m, k],
// and r [count, k, k] unless r is undefined.
void run_householder_qr_cpu(const BatchView& batch, at::Tensor& q, at::Tensor& r);
#ifdef RANKPRUNE_WITH_CUDA
void run_svd_small_cuda(const BatchView& batch, at::Tensor& left, at::Tensor& sigma, at::Tensor& right);
void run_householder_qr_cuda(const BatchView& batch, at::Tensor& q, at::Tensor& r);
#endif

}  // namespace rankprune
