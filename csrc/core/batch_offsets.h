// Where matrix b of a BatchView (core/batch.h) lies, in a form that kernels can take by value. Apart from
// core/batch.h so that the CUDA kernel files include no ATen header (their compile time is mostly header parsing).
#pragma once

#include <cstdint>

#include "core/group.h"

namespace rankprune {

struct BatchOffsets {
  int64_t inner, outer_stride, inner_stride;
  RP_HD int64_t offset(int64_t b) const { return (b / inner) * outer_stride + (b % inner) * inner_stride; }
};

}  // namespace rankprune
