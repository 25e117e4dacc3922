// A batch of matrices [..., m, n] with arbitrary strides, seen as at most two batch dimensions so that
// kernels can find every matrix where it lies (no copy for contiguous, channels_last or sliced inputs).
#pragma once

#include <ATen/ATen.h>

#include "core/batch_offsets.h"

namespace rankprune {

struct BatchView {
  int64_t count = 0;         // number of matrices
  int64_t inner = 1;         // matrix b sits at (b / inner) * outer_stride + (b % inner) * inner_stride
  int64_t outer_stride = 0;  // in elements
  int64_t inner_stride = 0;
  int64_t m = 0, n = 0, sm = 0, sn = 0;  // each matrix: m x n, element (i, j) at i * sm + j * sn
  at::Tensor tensor;         // the tensor the offsets refer to (a contiguous copy only when unavoidable)

  BatchOffsets offsets() const { return {inner, outer_stride, inner_stride}; }
  int64_t offset(int64_t b) const { return offsets().offset(b); }
};

// Matrices in row-major order of the batch dimensions of A.
inline BatchView make_batch_view(const at::Tensor& A) {
  BatchView v;
  const int64_t d = A.dim();
  v.m = A.size(d - 2);
  v.n = A.size(d - 1);
  v.count = 1;
  for (int64_t i = 0; i < d - 2; ++i) v.count *= A.size(i);
  // Batch dims of size > 1, merged where one stride steps over the next dim exactly.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride)
  for (int64_t i = 0; i < d - 2; ++i) {
    if (A.size(i) == 1) continue;
    if (!dims.empty() && dims.back().second == A.size(i) * A.stride(i)) {
      dims.back() = {dims.back().first * A.size(i), A.stride(i)};
    } else {
      dims.emplace_back(A.size(i), A.stride(i));
    }
  }
  at::Tensor t = A;
  if (dims.size() > 2) {  // three or more independent batch strides: one contiguous copy
    t = A.contiguous();
    dims = {{v.count, v.m * v.n}};
  }
  v.tensor = t;
  v.sm = t.stride(d - 2);
  v.sn = t.stride(d - 1);
  if (dims.size() == 2) {
    v.inner = dims[1].first;
    v.outer_stride = dims[0].second;
    v.inner_stride = dims[1].second;
  } else if (dims.size() == 1) {
    v.inner = dims[0].first;
    v.inner_stride = dims[0].second;
  }
  return v;
}

}  // namespace rankprune
