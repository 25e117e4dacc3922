// CUDA backend of lowrank_conv2d: out = conv1x1(conv_khxkw(x, w1), w2) + bias in one kernel.
//
// Each CTA owns BM = 64 output pixels (rows of the implicit GEMM, M = B * H' * W'):
//   phase 1: Y[BM, r] = im2col(x)[BM, C*kh*kw] * w1^T, an implicit GEMM over K chunks of BK (A gathered from x
//            with its strides, so NCHW and channels_last both work), tensor cores via WMMA, accumulators in
//            registers (each of the 4 warps holds 16 rows x r columns);
//   phase 2: Y is rounded to the input dtype (as the unfused pair would store it) into shared memory, then
//            out[BM, n-chunk] = Y * w2^T + bias over output-channel chunks of BN = 64.
// The r-channel intermediate never leaves the chip. float32 runs in TF32, only where the cuDNN TF32 flag
// (torch.backends.cudnn.allow_tf32, on by default) lets the unfused convolutions do the same.
// Shapes outside the kernel's cover (r not a multiple of 16 or above 128, float64, pre-Ampere GPUs) run the
// unfused path, and so, in auto mode, do shapes where the kernel is not expected to win (see `fused_expected_faster`)
// or, under cudnn.benchmark, measured slower than the cuDNN pair.
// The kernel is deliberately plain (single-buffered shared memory, no cp.async): a baseline for tuning.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/lowrank_conv.h"
#include "cuda/shared_memory.cuh"

namespace rankprune {
namespace {

using namespace nvcuda;

constexpr int kBM = 64;       // output pixels per CTA
constexpr int kBN = 64;       // output channels per phase-2 chunk
constexpr int kWarps = 4;     // each warp owns 16 of the BM rows
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRank = 128;

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

template <typename T, int RT>
void launch_fused(const FusedParams& p, int64_t n_blocks_y, cudaStream_t stream) {
  const size_t smem = Smem<T>::total_bytes(RT * 16);
  auto kernel = fused_lowrank_conv_kernel<T, RT>;
  allow_dynamic_shared_memory(kernel, smem);
  const dim3 grid((p.M + kBM - 1) / kBM, unsigned(n_blocks_y));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_fused_rank(const FusedParams& p, int64_t n_blocks_y, cudaStream_t stream) {
  switch (p.R / 16) {
    case 1: return launch_fused<T, 1>(p, n_blocks_y, stream);
    case 2: return launch_fused<T, 2>(p, n_blocks_y, stream);
    case 3: return launch_fused<T, 3>(p, n_blocks_y, stream);
    case 4: return launch_fused<T, 4>(p, n_blocks_y, stream);
    case 5: return launch_fused<T, 5>(p, n_blocks_y, stream);
    case 6: return launch_fused<T, 6>(p, n_blocks_y, stream);
    case 7: return launch_fused<T, 7>(p, n_blocks_y, stream);
    case 8: return launch_fused<T, 8>(p, n_blocks_y, stream);
    default: TORCH_CHECK(false, "rankprune.lowrank_conv2d: internal error, rank ", p.R, " reached the fused kernel");
  }
}

int64_t pixel_tiles(const at::Tensor& out) { return (out.size(0) * out.size(2) * out.size(3) + kBM - 1) / kBM; }

// Why the fused kernel cannot run this call, or nullptr when it can.
const char* fused_refusal(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& out) {
  const auto dtype = x.scalar_type();
  if (dtype == at::kDouble) return "float64";
  // The op is a convolution: its fp32 precision follows cuDNN's flag (which the unfused pair obeys), not matmul's.
  if (dtype == at::kFloat && !at::globalContext().allowTF32CuDNN()) return "float32 without TF32";
  const int64_t r = w1.size(0);
  if (r % 16 != 0 || r > kMaxRank) return "rank not a multiple of 16 up to 128";
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return "GPU older than sm_80";
  if (out.numel() == 0 || x.numel() == 0) return "empty tensor";
  if (out.size(0) * out.size(2) * out.size(3) >= (int64_t{1} << 31) - kBM) return "too many output pixels";
  if (x.size(1) * w1.size(2) * w1.size(3) >= (int64_t{1} << 31)) return "C*kh*kw too large";
  return nullptr;
}

void run_fused(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& bias,
               const LowrankConvArgs& a, at::Tensor& out) {
  FusedParams p{};
  p.x = x.data_ptr();
  p.w1 = w1.data_ptr();
  p.w2 = w2.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.C = int(x.size(1));
  p.H = int(x.size(2));
  p.W = int(x.size(3));
  p.N = int(w2.size(0));
  p.R = int(w1.size(0));
  p.kh = int(w1.size(2));
  p.kw = int(w1.size(3));
  p.Ho = int(out.size(2));
  p.Wo = int(out.size(3));
  p.sh = int(a.stride[0]);
  p.sw = int(a.stride[1]);
  p.ph = int(a.padding[0]);
  p.pw = int(a.padding[1]);
  p.dh = int(a.dilation[0]);
  p.dw = int(a.dilation[1]);
  p.M = int(out.size(0) * out.size(2) * out.size(3));
  p.K1 = p.C * p.kh * p.kw;
  p.pixel_fastest = !x.is_contiguous(at::MemoryFormat::ChannelsLast);
  for (int d = 0; d < 4; ++d) {
    p.xs[d] = x.stride(d);
    p.w1s[d] = w1.stride(d);
    p.os[d] = out.stride(d);
  }
  p.w2s[0] = w2.stride(0);
  p.w2s[1] = w2.stride(1);
  // Few pixel tiles (small batch, deep layers) leave SMs idle: split the output channels over blockIdx.y,
  // each split recomputing phase 1 (r/N of the work per extra split), until there are about 2 CTAs per SM.
  const int64_t m_blocks = pixel_tiles(out);
  const int64_t n_chunks = (p.N + kBN - 1) / kBN;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::min<int64_t>(n_chunks, std::max<int64_t>(1, (2 * sms + m_blocks - 1) / m_blocks));
  const int64_t chunks_per_split = (n_chunks + splits - 1) / splits;
  p.n_span = int(chunks_per_split * kBN);
  const int64_t n_blocks_y = (n_chunks + chunks_per_split - 1) / chunks_per_split;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kHalf: return launch_fused_rank<__half>(p, n_blocks_y, stream);
    case at::kBFloat16: return launch_fused_rank<__nv_bfloat16>(p, n_blocks_y, stream);
    case at::kFloat: return launch_fused_rank<float>(p, n_blocks_y, stream);
    default: TORCH_CHECK(false, "rankprune.lowrank_conv2d: internal error, dtype ", x.scalar_type());
  }
}

// ---- path choice ----
// RANKPRUNE_LOWRANK_CONV2D=fused|unfused forces a path (fused still needs a covered shape). "auto" (default)
// takes the static estimate below; when torch.backends.cudnn.benchmark is on it instead times both paths once
// per shape and remembers the faster one, like cuDNN's own benchmark mode. Timing cannot run inside CUDA-graph
// capture (it synchronizes), so a captured call uses the remembered choice when the shape was timed eagerly
// before (a graph then replays what the eager run chose) and the static estimate otherwise.
enum class Path { Fused, Unfused };

// Static estimate of whether the fused kernel beats the cuDNN pair; nothing here is measured yet.
// Fusion saves at most the r-channel round trip through memory, while the kernel has no split-K and no
// pipelining: each CTA walks all C*kh*kw / BK K-steps of phase 1 serially, and when there are few 64-pixel
// tiles the output channels are split over blockIdx.y, each split recomputing phase 1. The estimate for an
// H200 (docs/ and the CUDA review) puts it 3-5x behind cuDNN on deep layers (512 channels at 7x7, r = 128:
// 4608-long K, a few hundred CTAs at most) and at batch 1, and about even to ahead on shallow, wide-image
// layers. So auto fuses only when both hold:
//  * at least two waves of pixel tiles, 2 * #SMs (no phase-1 recomputation, latency hidden across CTAs);
//  * K1 = C*kh*kw <= 1152 (e.g. 128 channels with a 3x3 kernel: at most 36 serial K-steps in 16-bit).
// On ResNet-50 at batch 32 this fuses the 3x3 layers at 56x56 and 28x28 and leaves 14x14 and 7x7 to cuDNN.
constexpr int64_t kFusedMinWaves = 2;
constexpr int64_t kFusedMaxK1 = 1152;

bool fused_expected_faster(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& out) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t k1 = x.size(1) * w1.size(2) * w1.size(3);
  return pixel_tiles(out) >= kFusedMinWaves * sms && k1 <= kFusedMaxK1;
}

std::string path_setting() {
  const char* env = std::getenv("RANKPRUNE_LOWRANK_CONV2D");
  std::string v = env ? env : "auto";
  TORCH_CHECK(v == "auto" || v == "fused" || v == "unfused",
              "rankprune.lowrank_conv2d: RANKPRUNE_LOWRANK_CONV2D must be auto, fused or unfused, got '", v, "'");
  return v;
}

// sizes of x and w1, N, stride/padding/dilation; dtype, channels_last, bias, device.
using ShapeKey = std::tuple<std::vector<int64_t>, int, bool, bool, int>;

ShapeKey shape_key(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, bool has_bias,
                   const LowrankConvArgs& a) {
  std::vector<int64_t> dims(x.sizes().begin(), x.sizes().end());
  dims.insert(dims.end(), w1.sizes().begin(), w1.sizes().end());
  dims.push_back(w2.size(0));
  for (int d = 0; d < 2; ++d) {
    dims.push_back(a.stride[d]);
    dims.push_back(a.padding[d]);
    dims.push_back(a.dilation[d]);
  }
  return {dims, int(x.scalar_type()), x.is_contiguous(at::MemoryFormat::ChannelsLast), has_bias,
          int(x.get_device())};
}

float time_ms(const std::function<void()>& fn, cudaStream_t stream) {
  fn();  // warm-up (also lets cuDNN pick its algorithm)
  cudaEvent_t start, stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  constexpr int kRepeats = 5;
  C10_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < kRepeats; ++i) fn();
  C10_CUDA_CHECK(cudaEventRecord(stop, stream));
  C10_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(stop));
  return ms / kRepeats;
}

}  // namespace

at::Tensor lowrank_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& bias_in, const LowrankConvArgs& a) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const std::string setting = path_setting();
  if (setting == "unfused") return lowrank_conv2d_unfused(x_in, w1, w2, bias_in, a);
  // The kernel reads x, w1 and w2 through their strides; the bias as a dense vector.
  const std::optional<at::Tensor> bias = bias_in.has_value() ? std::optional(bias_in->contiguous()) : std::nullopt;

  const auto format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(format);
  const int64_t ho = conv_out_size(x.size(2), w1.size(2), a.stride[0], a.padding[0], a.dilation[0]);
  const int64_t wo = conv_out_size(x.size(3), w1.size(3), a.stride[1], a.padding[1], a.dilation[1]);
  at::Tensor out = at::empty({x.size(0), w2.size(0), ho, wo}, x.options().memory_format(format));
  if (const char* why = fused_refusal(x, w1, out)) {
    TORCH_CHECK(setting != "fused", "rankprune.lowrank_conv2d: RANKPRUNE_LOWRANK_CONV2D=fused but the fused kernel "
                "does not cover this call (", why, ")");
    return lowrank_conv2d_unfused(x, w1, w2, bias, a);
  }
  if (setting == "auto") {
    Path path = fused_expected_faster(x, w1, out) ? Path::Fused : Path::Unfused;
    if (at::globalContext().benchmarkCuDNN()) {
      static std::mutex mutex;
      static std::map<ShapeKey, Path> chosen;
      const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
      const ShapeKey key = shape_key(x, w1, w2, bias.has_value(), a);
      std::lock_guard<std::mutex> lock(mutex);
      auto it = chosen.find(key);
      if (it == chosen.end() && !capturing) {
        cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        const float fused_ms = time_ms([&] { run_fused(x, w1, w2, bias, a, out); }, stream);
        const float unfused_ms = time_ms([&] { lowrank_conv2d_unfused(x, w1, w2, bias, a); }, stream);
        it = chosen.emplace(key, fused_ms <= unfused_ms ? Path::Fused : Path::Unfused).first;
      }
      if (it != chosen.end()) path = it->second;
    }
    if (path == Path::Unfused) return lowrank_conv2d_unfused(x, w1, w2, bias, a);
  }
  run_fused(x, w1, w2, bias, a, out);
  return out;
}

}  // namespace rankprune
