// Thread groups that run one small-matrix algorithm together.
//
// The per-matrix numerics (csrc/core/*.h) are written once against this interface and run
//   - on the CPU by SerialGroup: one thread owns the matrix, sync() is a no-op, sums are the thread's own;
//   - on the GPU by a warp (WarpGroup) or a whole block (BlockGroup), with the matrix in shared memory.
// So the CPU tests exercise exactly the arithmetic the CUDA kernels perform; only the barriers and the
// reductions below differ between the two.
//
// Contract for code using a group G:
//   for (int i = g.rank(); i < n; i += g.size())   distributes a loop over the group;
//   g.sum(partial) / g.max(partial)                 combine one value per thread; every thread gets the result
//                                                   (they include a barrier);
//   g.sync()                                        orders shared-memory writes before later reads.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RP_HD __host__ __device__ __forceinline__
#define RP_DEVICE __device__ __forceinline__
#else
#define RP_HD inline
#endif

namespace rankprune {

struct SerialGroup {
  RP_HD int rank() const { return 0; }
  RP_HD int size() const { return 1; }
  RP_HD void sync() const {}
  template <typename T>
  RP_HD T sum(T v) const {
    return v;
  }
  template <typename T>
  RP_HD T max(T v) const {
    return v;
  }
};

#if defined(__CUDACC__)

template <typename T>
RP_DEVICE T warp_sum(T v, unsigned mask = 0xffffffffu) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
  return v;
}

template <typename T>
RP_DEVICE T warp_max(T v, unsigned mask = 0xffffffffu) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(mask, v, off));
  return v;
}

// One warp (32 lanes) per matrix; several warps of a block work on different matrices.
struct WarpGroup {
  int lane;
  RP_DEVICE int rank() const { return lane; }
  RP_DEVICE int size() const { return 32; }
  RP_DEVICE void sync() const { __syncwarp(); }
  template <typename T>
  RP_DEVICE T sum(T v) const {
    return warp_sum(v);
  }
  template <typename T>
  RP_DEVICE T max(T v) const {
    return warp_max(v);
  }
};

// The whole block per matrix; blockDim.x must be a multiple of 32. `scratch` holds one double per warp
// (shared memory, reused by every reduction).
struct BlockGroup {
  double* scratch;
  RP_DEVICE int rank() const { return threadIdx.x; }
  RP_DEVICE int size() const { return blockDim.x; }
  RP_DEVICE void sync() const { __syncthreads(); }

  template <typename T, typename Op>
  RP_DEVICE T reduce(T v, T identity, Op op) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = op(v);
    __syncthreads();  // the previous reduction's readers are done with scratch
    if (lane == 0) scratch[warp] = static_cast<double>(v);
    __syncthreads();
    T r = lane < nwarps ? static_cast<T>(scratch[lane]) : identity;
    return op(r);
  }
  template <typename T>
  RP_DEVICE T sum(T v) const {
    return reduce(v, T(0), [](T x) { return warp_sum(x); });
  }
  template <typename T>
  RP_DEVICE T max(T v) const {
    return reduce(v, T(-INFINITY), [](T x) { return warp_max(x); });
  }
};

#endif  // __CUDACC__

}  // namespace rankprune
