// Backend entry points that run core/svdvals_small.h over a whole batch (csrc/cpu, csrc/cuda).
#pragma once

#include "core/batch.h"
#include "core/svdvals_small.h"

namespace rankprune {

// out: contiguous, `count * out_stride` values of float (float64 for float64 input); matrix b writes
// out[b * out_stride ...]. rtol < 0 selects the default tolerance (Rank epilogue only).
void run_svdvals_cpu(const BatchView& batch, SvdvalsEpilogue epilogue, double rtol, at::Tensor& out);
#ifdef RANKPRUNE_WITH_CUDA
void run_svdvals_cuda(const BatchView& batch, SvdvalsEpilogue epilogue, double rtol, at::Tensor& out);
#endif

}  // namespace rankprune
