// CUDA kernel of lowrank_conv2d: out = conv1x1(conv_khxkw(x, w1), w2) + bias in one kernel.
//
// Each CTA owns BM = 64 output pixels (rows of the implicit GEMM, M = B * H' * W'):
//   phase 1: Y[BM, r] = im2col(x)[BM, C*kh*kw] * w1^T, an implicit GEMM over K chunks of BK (A gathered from x
//            with its strides, so NCHW and channels_last both work), tensor cores via WMMA, accumulators in
//            registers (each of the 4 warps holds 16 rows x r columns);
//   phase 2: Y is rounded to the input dtype (as the unfused pair would store it) into shared memory, then
//            out[BM, n-chunk] = Y * w2^T + bias over output-channel chunks of BN = 64.
// The r-channel intermediate never leaves the chip. float32 runs in TF32, only where the cuDNN TF32 flag
// (torch.backends.cudnn.allow_tf32, on by default) lets the unfused convolutions do the same.
// The kernel is deliberately plain (single-buffered shared memory, no cp.async): a baseline for tuning.
// Which calls take it is decided on the host (lowrank_conv_cuda.cpp). No ATen header here (see launch.h).
#include <mma.h>

#include <type_traits>

#include "cuda/launch.h"
#include "cuda/lowrank_conv_kernels.h"

namespace rankprune {
namespace {

using namespace nvcuda;

constexpr int kWarps = 4;     // each warp owns 16 of the BM rows
constexpr int kThreads = kWarps * 32;

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  using Operand = __half;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;  // 16 bytes of padding per shared-memory row (bank spread, WMMA ldm rule)
};
template <>
struct Mma<__nv_bfloat16> {
  using Operand = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
};
template <>
struct Mma<float> {
  using Operand = wmma::precision::tf32;
  static constexpr int kK = 8;
  static constexpr int kPad = 4;
};

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }

template <typename T>
struct Smem {
  // Row pitches (elements) of the shared-memory tiles; all WMMA pointers land on 32-byte boundaries.
  static constexpr int kBK = 2 * Mma<T>::kK;
  static constexpr int kPad = Mma<T>::kPad;
  __host__ __device__ static constexpr size_t round128(size_t bytes) { return (bytes + 127) / 128 * 128; }
  __host__ __device__ static constexpr size_t ys_bytes(int R) { return round128(size_t(kBM) * (R + kPad) * sizeof(T)); }
  __host__ __device__ static constexpr size_t region_bytes(int R) {
    const size_t phase1 = size_t(kBM) * (kBK + kPad) * sizeof(T) + size_t(kBK) * (R + kPad) * sizeof(T);
    const size_t stage = size_t(kBM) * (R + 4) * sizeof(float);
    const size_t phase2 = size_t(kBN) * (R + kPad) * sizeof(T) + size_t(kBM) * (kBN + 4) * sizeof(float);
    const size_t larger = phase1 > stage ? phase1 : stage;
    return round128(larger > phase2 ? larger : phase2);
  }
  __host__ __device__ static constexpr size_t total_bytes(int R) { return ys_bytes(R) + region_bytes(R); }
};

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) fused_lowrank_conv_kernel(const FusedParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Operand = typename Mma<T>::Operand;
  constexpr int R = RT * 16;
  constexpr int MK = Mma<T>::kK;
  constexpr int BK = Smem<T>::kBK;
  constexpr int PAD = Smem<T>::kPad;
  constexpr int LDA = BK + PAD;   // As[kBM][LDA]
  constexpr int LDR = R + PAD;    // Bs[BK][LDR], ys[kBM][LDR], w2s[kBN][LDR]
  constexpr int LDS = R + 4;      // stage[kBM][LDS] (float)
  constexpr int LDO = kBN + 4;    // os[kBM][LDO] (float)

  extern __shared__ __align__(128) unsigned char smem[];
  T* ys = reinterpret_cast<T*>(smem);
  unsigned char* region = smem + Smem<T>::ys_bytes(R);
  T* As = reinterpret_cast<T*>(region);
  T* Bs = As + kBM * LDA;
  float* stage = reinterpret_cast<float*>(region);
  T* w2s = reinterpret_cast<T*>(region);
  float* os = reinterpret_cast<float*>(region + size_t(kBN) * LDR * sizeof(T));

  const T* x = static_cast<const T*>(p.x);
  const T* w1 = static_cast<const T*>(p.w1);
  const T* w2 = static_cast<const T*>(p.w2);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int m0 = blockIdx.x * kBM;

  // Index arithmetic hoisted out of the gathers: per tile row (output pixel) the image offsets and the top-left
  // input coordinate, per tile column (k = (i, j, c)) the channel offsets and the tap displacement.
  constexpr int kOutside = -(1 << 30);  // a coordinate that fails every bounds check
  __shared__ int64_t row_x[kBM], row_out[kBM];
  __shared__ int row_iy[kBM], row_ix[kBM];
  __shared__ int64_t col_x[BK], col_w1[BK];
  __shared__ int col_dy[BK], col_dx[BK];
  if (tid < kBM) {
    const int m = m0 + tid;
    const int hw_out = p.Ho * p.Wo;
    const int b = m / hw_out, oy = (m % hw_out) / p.Wo, ox = m % p.Wo;
    row_x[tid] = b * p.xs[0];
    row_out[tid] = b * p.os[0] + oy * p.os[2] + ox * p.os[3];
    row_iy[tid] = m < p.M ? oy * p.sh - p.ph : kOutside;
    row_ix[tid] = ox * p.sw - p.pw;
  }

  // ---- phase 1: Y = im2col(x) * w1^T ----
  wmma::fragment<wmma::accumulator, 16, 16, MK, float> acc[RT];
#pragma unroll
  for (int f = 0; f < RT; ++f) wmma::fill_fragment(acc[f], 0.0f);

  for (int k0 = 0; k0 < p.K1; k0 += BK) {
    // (The previous step's gathers finished before its MMA barrier, so the column table can be rewritten.)
    if (tid < BK) {
      const int k = k0 + tid;
      const int c = k % p.C, ij = k / p.C;
      const int i = ij / p.kw, j = ij % p.kw;
      col_x[tid] = c * p.xs[1];
      col_w1[tid] = c * p.w1s[1] + i * p.w1s[2] + j * p.w1s[3];
      col_dy[tid] = k < p.K1 ? i * p.dh : kOutside;
      col_dx[tid] = j * p.dw;
    }
    __syncthreads();
    for (int idx = tid; idx < kBM * BK; idx += kThreads) {
      const int row = p.pixel_fastest ? idx % kBM : idx / BK;
      const int col = p.pixel_fastest ? idx / kBM : idx % BK;
      const int iy = row_iy[row] + col_dy[col];
      const int ix = row_ix[row] + col_dx[col];
      T v = from_float<T>(0.0f);
      if (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W) {
        v = x[row_x[row] + col_x[col] + iy * p.xs[2] + ix * p.xs[3]];
      }
      As[row * LDA + col] = v;
    }
    for (int idx = tid; idx < BK * R; idx += kThreads) {
      const int kk = idx % BK, r = idx / BK;
      Bs[kk * LDR + r] = k0 + kk < p.K1 ? w1[r * p.w1s[0] + col_w1[kk]] : from_float<T>(0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += MK) {
      wmma::fragment<wmma::matrix_a, 16, 16, MK, Operand, wmma::row_major> a;
      wmma::load_matrix_sync(a, As + warp * 16 * LDA + kk, LDA);
      if constexpr (std::is_same_v<T, float>) {
        for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
      }
#pragma unroll
      for (int f = 0; f < RT; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, MK, Operand, wmma::row_major> bfrag;
        wmma::load_matrix_sync(bfrag, Bs + kk * LDR + f * 16, LDR);
        if constexpr (std::is_same_v<T, float>) {
          for (int t = 0; t < bfrag.num_elements; ++t) bfrag.x[t] = wmma::__float_to_tf32(bfrag.x[t]);
        }
        wmma::mma_sync(acc[f], a, bfrag, acc[f]);
      }
    }
    __syncthreads();  // As/Bs are refilled (or reused as the stage) next
  }

  // Y rounded to T, each warp its own 16 rows (stage and ys rows are private to the warp).
#pragma unroll
  for (int f = 0; f < RT; ++f) {
    wmma::store_matrix_sync(stage + warp * 16 * LDS + f * 16, acc[f], LDS, wmma::mem_row_major);
  }
  __syncwarp();
  for (int idx = lane; idx < 16 * R; idx += 32) {
    const int row = warp * 16 + idx / R, col = idx % R;
    ys[row * LDR + col] = from_float<T>(stage[row * LDS + col]);
  }
  __syncthreads();  // the stage region becomes w2s/os

  // ---- phase 2: out = Y * w2^T + bias over output-channel chunks ----
  const int n_begin = blockIdx.y * p.n_span;
  const int n_end = min(p.N, n_begin + p.n_span);
  for (int n0 = n_begin; n0 < n_end; n0 += kBN) {
    for (int idx = tid; idx < kBN * R; idx += kThreads) {
      const int n = idx / R, r = idx % R;
      w2s[n * LDR + r] = n0 + n < n_end ? w2[(n0 + n) * p.w2s[0] + r * p.w2s[1]] : from_float<T>(0.0f);
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, MK, float> acc2[kBN / 16];
#pragma unroll
    for (int f = 0; f < kBN / 16; ++f) wmma::fill_fragment(acc2[f], 0.0f);
#pragma unroll
    for (int k = 0; k < R; k += MK) {
      wmma::fragment<wmma::matrix_a, 16, 16, MK, Operand, wmma::row_major> a;
      wmma::load_matrix_sync(a, ys + warp * 16 * LDR + k, LDR);
      if constexpr (std::is_same_v<T, float>) {
        for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
      }
#pragma unroll
      for (int f = 0; f < kBN / 16; ++f) {
        // w2s holds w2[n, r] row-major, i.e. the B operand (r x n) column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, MK, Operand, wmma::col_major> bfrag;
        wmma::load_matrix_sync(bfrag, w2s + f * 16 * LDR + k, LDR);
        if constexpr (std::is_same_v<T, float>) {
          for (int t = 0; t < bfrag.num_elements; ++t) bfrag.x[t] = wmma::__float_to_tf32(bfrag.x[t]);
        }
        wmma::mma_sync(acc2[f], a, bfrag, acc2[f]);
      }
    }
#pragma unroll
    for (int f = 0; f < kBN / 16; ++f) {
      wmma::store_matrix_sync(os + warp * 16 * LDO + f * 16, acc2[f], LDO, wmma::mem_row_major);
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * kBN; idx += 32) {
      const int row = p.pixel_fastest ? idx % 16 : idx / kBN;
      const int col = p.pixel_fastest ? idx / 16 : idx % kBN;
      const int m = m0 + warp * 16 + row;
      const int n = n0 + col;
      if (m < p.M && n < n_end) {
        float v = os[(warp * 16 + row) * LDO + col];
        if (bias != nullptr) v += to_float<T>(bias[n]);
        out[row_out[warp * 16 + row] + n * p.os[1]] = from_float<T>(v);
      }
    }
    __syncthreads();  // w2s is refilled for the next chunk
  }
#else
  __trap();  // the host never launches the kernel below sm_80
#endif
}

}  // namespace

template <typename T, int RT>
void launch_fused(const FusedParams& p, int64_t n_blocks_y, cudaStream_t stream) {
  const size_t smem = Smem<T>::total_bytes(RT * 16);
  auto kernel = fused_lowrank_conv_kernel<T, RT>;
  allow_dynamic_shared_memory(kernel, smem);
  const dim3 grid((p.M + kBM - 1) / kBM, unsigned(n_blocks_y));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_kernel_launch();
}

// Every operand type and rank that lowrank_conv_cuda.cpp launches (launch_fused_rank).
#define RANKPRUNE_FUSED_RANKS(T)                                                   \
  template void launch_fused<T, 1>(const FusedParams&, int64_t, cudaStream_t); \
  template void launch_fused<T, 2>(const FusedParams&, int64_t, cudaStream_t); \
  template void launch_fused<T, 3>(const FusedParams&, int64_t, cudaStream_t); \
  template void launch_fused<T, 4>(const FusedParams&, int64_t, cudaStream_t); \
  template void launch_fused<T, 5>(const FusedParams&, int64_t, cudaStream_t); \
  template void launch_fused<T, 6>(const FusedParams&, int64_t, cudaStream_t); \
  template void launch_fused<T, 7>(const FusedParams&, int64_t, cudaStream_t); \
  template void launch_fused<T, 8>(const FusedParams&, int64_t, cudaStream_t);
RANKPRUNE_FUSED_RANKS(__half)
RANKPRUNE_FUSED_RANKS(__nv_bfloat16)
RANKPRUNE_FUSED_RANKS(float)
#undef RANKPRUNE_FUSED_RANKS

}  // namespace rankprune
