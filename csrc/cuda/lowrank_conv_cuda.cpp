// CUDA backend of lowrank_conv2d, host side: which path a call takes, and the launch of the fused kernel
// (lowrank_conv_kernels.cu: out = conv1x1(conv_khxkw(x, w1), w2) + bias in one kernel, the r-channel
// intermediate never leaving the chip).
// Shapes outside the kernel's cover (r not a multiple of 16 or above 128, float64, pre-Ampere GPUs) run the
// unfused path, and so does auto mode, unless cudnn.benchmark measured the kernel faster for the shape (see
// "path choice" below).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "core/lowrank_conv.h"
#include "cuda/lowrank_conv_kernels.h"

namespace rankprune {
namespace {

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
// runs the cuDNN pair, except under torch.backends.cudnn.benchmark, where it times both paths once per shape and
// remembers the faster one, like cuDNN's own benchmark mode. Timing cannot run inside CUDA-graph capture (it
// synchronizes), so a captured call uses the remembered choice when the shape was timed eagerly before (a graph
// then replays what the eager run chose) and the cuDNN pair otherwise.
//
// Why no static estimate: the kernel has no split-K and no pipelining (each CTA walks all C*kh*kw / BK K-steps
// of phase 1 serially), and on an H100 it lost to the cuDNN pair on every ResNet-50 3x3 shape measured
// (bench_lowrank_conv, bfloat16, batch 8 and 32: 1.6-38x slower, geometric means 5.3x and 10.4x in two runs),
// including the shallow wide-image layers a former estimate fused (2 waves of pixel tiles, C*kh*kw <= 1152): with
// it, ResNet-50 decomposed to half its FLOPs ran at 1.36x dense under CUDA graphs against 1.08x with the pair
// (benchmarks/results, gpu_check of 2026-12-05).
enum class Path { Fused, Unfused };

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
  const bool timed_choice = setting == "auto" && at::globalContext().benchmarkCuDNN();
  if (setting == "unfused" || (setting == "auto" && !timed_choice)) {
    return lowrank_conv2d_unfused(x_in, w1, w2, bias_in, a);
  }
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
  if (timed_choice) {
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
    if (it == chosen.end() || it->second == Path::Unfused) return lowrank_conv2d_unfused(x, w1, w2, bias, a);
  }
  run_fused(x, w1, w2, bias, a, out);
  return out;
}

}  // namespace rankprune
