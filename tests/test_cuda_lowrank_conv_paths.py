"""CUDA paths of rankprune.lowrank_conv2d that test_lowrank_conv_op.py does not reach (issue 13, cuda-review.md
section 3 item 6): ranks 64-112 of the fused kernel, its multi-chunk phase 2, dilation / padding / kernel shapes /
stride (2, 1) *on the fused path*, float32 without TF32, NaN/Inf propagation, the auto path choice, CUDA-graph
capture and an input of more than 2^31 elements. The fused path is forced with RANKPRUNE_LOWRANK_CONV2D=fused
(which raises rather than falling back on a shape it does not cover), so each test knows which path it runs.
Every GPU result is compared with the float64 reference (ops.lowrank_conv2d_reference)."""
import contextlib

import pytest
import torch

from rankprune import ops

pytestmark = pytest.mark.cuda

TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-2}  # tensor-core (TF32) arithmetic


@contextlib.contextmanager
def backend_flags(**flags):
    """Set torch.backends.cudnn flags (benchmark, allow_tf32, deterministic) for the block, then restore them."""
    old = {name: getattr(torch.backends.cudnn, name) for name in flags}
    for name, value in flags.items():
        setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(torch.backends.cudnn, name, value)


def _operands(b, c, hw, r, n, kernel=(3, 3), dtype=torch.float16, bias=True):
    h, w = hw if isinstance(hw, tuple) else (hw, hw)
    kh, kw = kernel
    x = torch.randn(b, c, h, w, device="cuda", dtype=dtype)
    w1 = (torch.randn(r, c, kh, kw, device="cuda", dtype=dtype) / (c * kh * kw) ** 0.5)
    w2 = (torch.randn(n, r, 1, 1, device="cuda", dtype=dtype) / r ** 0.5)
    b_ = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    return x, w1, w2, b_


def _check(x, w1, w2, b, stride=1, padding=1, dilation=1):
    out = ops.lowrank_conv2d(x, w1, w2, b, stride, padding, dilation)
    ref = ops.lowrank_conv2d_reference(x, w1, w2, b, stride, padding, dilation)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r", [64, 80, 96, 112])
def test_fused_ranks_64_to_112(dtype, r, monkeypatch, seed):
    # RT = 4..7 of the kernel; fp16/bf16 r = 112 needs 48128 B dynamic + 2304 B static shared memory, over the
    # default 48 KiB: the launch only works when the opt-in counts the static tables (review F1).
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    with backend_flags(allow_tf32=True):
        _check(*_operands(2, 24, 11, r, 72, dtype=dtype))


def test_fused_multi_chunk_phase2(monkeypatch, seed):
    # Enough 64-pixel tiles (>= 2 per SM) that the output channels are not split over blockIdx.y, and
    # N = 200 > 64: one CTA loops over four phase-2 chunks (chunks_per_split > 1), the last one partial.
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hw = 48
    batch = -(-2 * sms * 64 // (hw * hw)) + 1
    _check(*_operands(batch, 16, hw, 32, 200))


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (2, 1), 1, 1),
    ((3, 3), 1, 2, 2),
    ((3, 3), 1, 0, 1),
    ((5, 3), 1, (2, 1), 1),
    ((1, 3), (1, 2), (0, 1), (1, 3)),
    ((1, 1), 1, 0, 1),
    ((7, 7), 2, 3, 1),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_conv_geometry(kernel, stride, padding, dilation, channels_last, monkeypatch, seed):
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    x, w1, w2, b = _operands(2, 20, (13, 10), 16, 36, kernel=kernel, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = _check(x, w1, w2, b, stride, padding, dilation)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_fused_strided_weights(monkeypatch, seed):
    # The kernel reads w1 and w2 through their strides: channels_last w1, a transposed view for w2.
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    x, w1, w2, b = _operands(2, 24, 9, 32, 48)
    w1 = w1.contiguous(memory_format=torch.channels_last)
    w2 = w2.squeeze(-1).squeeze(-1).t().contiguous().t()[..., None, None]
    assert not w2.is_contiguous()
    _check(x, w1, w2, b)


def test_float32_tf32_follows_cudnn_flag(monkeypatch, seed):
    # The op is a convolution: float32 is fused (in TF32) when cudnn.allow_tf32 is on, whatever the matmul flag
    # says; with it off the kernel refuses and auto runs the cuDNN pair in full float32.
    x, w1, w2, b = _operands(2, 24, 10, 32, 40, dtype=torch.float32)
    ref = ops.lowrank_conv2d_reference(x, w1, w2, b, 1, 1, 1)
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
        with backend_flags(allow_tf32=True):
            _check(x, w1, w2, b)
        with backend_flags(allow_tf32=False):
            with pytest.raises(RuntimeError, match="float32 without TF32"):
                ops.lowrank_conv2d(x, w1, w2, b, 1, 1, 1)
            monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "auto")
            out = ops.lowrank_conv2d(x, w1, w2, b, 1, 1, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)  # IEEE float32, not TF32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_propagation_fused_matches_cudnn(bad, monkeypatch, seed):
    x, w1, w2, b = _operands(2, 16, 12, 16, 24)
    x[0, 3, 5, 7] = bad
    x[1, 0, 0, 0] = bad
    outs = {}
    for setting in ("fused", "unfused"):
        monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", setting)
        outs[setting] = ops.lowrank_conv2d(x, w1, w2, b, 1, 1, 1)
    fused, unfused = outs["fused"], outs["unfused"]
    # A bad input poisons the 3x3 neighbourhood of output pixels, every output channel; nothing else.
    assert torch.equal(~fused.isfinite(), ~unfused.isfinite())
    if bad != bad:  # NaN stays NaN. An inf may come out as inf or NaN: cuDNN's Winograd and FFT algorithms
        # add and subtract input pixels in their transforms (inf - inf), a direct convolution does not (seen on
        # an H100: the same non-finite pixels, NaN in different ones).
        assert torch.equal(fused.isnan(), unfused.isnan())
    bad_pixels = (~fused.isfinite()).any(1)
    assert int(bad_pixels.sum()) == 9 + 4
    assert bool((~fused.isfinite()).all(1)[bad_pixels].all())
    good = fused.isfinite()
    torch.testing.assert_close(fused[good].double(), unfused[good].double(), rtol=2e-2, atol=2e-2)


def _auto_path(x, w1, w2, b, monkeypatch):
    """Which path auto took, told apart by bits: each path is deterministic and they round differently."""
    results = {}
    for setting in ("auto", "fused", "unfused"):
        monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", setting)
        results[setting] = ops.lowrank_conv2d(x, w1, w2, b, 1, 1, 1)
    assert not torch.equal(results["fused"], results["unfused"]), "paths indistinguishable; pick other inputs"
    return "fused" if torch.equal(results["auto"], results["fused"]) else (
        "unfused" if torch.equal(results["auto"], results["unfused"]) else "neither")


def test_auto_runs_the_cudnn_pair_without_cudnn_benchmark(monkeypatch, seed):
    # Without cudnn.benchmark auto takes the cuDNN pair on every shape, the shallow wide layers a former static
    # estimate fused included (csrc/cuda/lowrank_conv_cuda.cpp, "path choice": the kernel lost on all of them
    # on an H100).
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with backend_flags(benchmark=False, deterministic=True):
        shallow_batch = -(-2 * sms * 64 // (28 * 28))
        assert _auto_path(*_operands(shallow_batch, 64, 28, 16, 64), monkeypatch) == "unfused"
        assert _auto_path(*_operands(1, 512, 7, 128, 512), monkeypatch) == "unfused"
        assert _auto_path(*_operands(shallow_batch, 256, 28, 64, 64), monkeypatch) == "unfused"


def _capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# "cudnn_benchmark", not "benchmark": pytest-benchmark, where installed, owns a fixture of that name.
@pytest.mark.parametrize("setting, cudnn_benchmark", [("fused", False), ("auto", False), ("auto", True)])
def test_cuda_graph_capture(setting, cudnn_benchmark, monkeypatch, seed):
    # Captured and replayed on new data; under cudnn.benchmark a captured call must reuse the path timed eagerly,
    # so the replay gives the eager call's bits.
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", setting)
    x, w1, w2, b = _operands(4, 32, 20, 32, 48)
    with backend_flags(benchmark=cudnn_benchmark, deterministic=True):
        graph, out = _capture(lambda: ops.lowrank_conv2d(x, w1, w2, b, 1, 1, 1))
        x.copy_(torch.randn_like(x))
        graph.replay()
        eager = ops.lowrank_conv2d(x, w1, w2, b, 1, 1, 1)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double(), ops.lowrank_conv2d_reference(x, w1, w2, b, 1, 1, 1), rtol=2e-2, atol=2e-2)
    assert torch.equal(out, eager)


def test_fused_input_over_2_31_elements(monkeypatch):
    # 2.15e9 fp16 elements (4.3 GB): pixel offsets of x need 64-bit arithmetic. A 1x1 w1 with stride 16 keeps
    # the output small; the reference runs on the strided subsample, which is the same convolution.
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    x = torch.empty(1, 16, 12000, 11200, device="cuda", dtype=torch.float16)
    assert x.numel() > 2 ** 31
    x.normal_()
    w1 = torch.randn(16, 16, 1, 1, device="cuda", dtype=torch.float16) / 4
    w2 = torch.randn(32, 16, 1, 1, device="cuda", dtype=torch.float16) / 4
    out = ops.lowrank_conv2d(x, w1, w2, None, 16, 0, 1)
    tail = x[:, :, -16 * 20::16, ::16].contiguous()  # the last 20 output rows
    del x
    ref = ops.lowrank_conv2d_reference(tail, w1, w2, None, 1, 0, 1)
    torch.testing.assert_close(out[:, :, -20:].double(), ref, rtol=2e-2, atol=2e-2)
