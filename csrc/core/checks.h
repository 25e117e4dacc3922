// Argument checks shared by the ops: one clear message per misuse.
#pragma once

#include <ATen/ATen.h>

namespace rankprune {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_input(const at::Tensor& A, const char* op, const char* name) {
  TORCH_CHECK(is_supported_float(A.scalar_type()), "rankprune.", op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", A.scalar_type());
}

inline void check_matrix_batch(const at::Tensor& A, const char* op) {
  TORCH_CHECK(A.dim() >= 2, "rankprune.", op, ": expected a batch of matrices [..., m, n], got a ", A.dim(),
              "-d tensor of shape ", A.sizes());
  check_float_input(A, op, "A");
}

inline void check_feature_maps(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, "rankprune.", op, ": expected activations [N, C, H, W], got shape ", x.sizes());
  check_float_input(x, op, "x");
}

// float32 results for float16/bfloat16/float32 inputs, float64 for float64.
inline at::ScalarType real_result_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace rankprune
