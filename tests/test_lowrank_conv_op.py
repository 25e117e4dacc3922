import pytest
import torch
import torch.nn.functional as F

import rankprune
from rankprune import ops

from conftest import devices

# (C, N, r, kernel, stride, padding, dilation, H, W). With r = 2-4 these run the cuDNN pair on CUDA (the fused kernel
# needs r a multiple of 16): the fused path's geometry is tested in test_cuda_lowrank_conv_paths.py.
SHAPES = [
    (4, 6, 3, (3, 3), (1, 1), (1, 1), (1, 1), 7, 6),
    (5, 7, 2, (3, 2), (2, 1), (1, 2), (1, 2), 9, 8),
    (3, 4, 4, (1, 1), (2, 2), (0, 0), (1, 1), 5, 5),
    (2, 3, 2, (5, 3), (1, 3), (2, 0), (2, 1), 12, 10),
]


def _inputs(shape, dtype, device, bias=True, channels_last=False, requires_grad=False):
    c, n, r, k, s, p, d, h, w = shape
    x = torch.randn(2, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(r, c, *k, dtype=dtype, device=device)
    w2 = torch.randn(n, r, 1, 1, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in (x, w1, w2, b)]
    return (*tensors, s, p, d)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(device, shape, channels_last, seed):
    x, w1, w2, b, s, p, d = _inputs(shape, torch.float32, device, channels_last=channels_last)
    # IEEE float32: cuDNN's channels_last kernels run in TF32 when allowed (the default; the op follows that flag,
    # as test_cuda_lowrank_conv_paths.py checks), which is 1e-3 arithmetic, not 1e-4.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = ops.lowrank_conv2d(x, w1, w2, b, s, p, d)
    ref = ops.lowrank_conv2d_reference(x, w1, w2, b, s, p, d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    want_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=want_format)


@pytest.mark.parametrize("device", devices())
def test_no_bias_and_reference_float64(device, seed):
    x, w1, w2, _, s, p, d = _inputs(SHAPES[1], torch.float64, device, bias=False)
    torch.testing.assert_close(ops.lowrank_conv2d(x, w1, w2, None, s, p, d),
                               ops.lowrank_conv2d_reference(x, w1, w2, None, s, p, d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 2, (3, 2), (2, 1), (1, 1), (1, 2), 5, 5), (3, 2, 2, (1, 3), (1, 2), (0, 1), (1, 1), 3, 6)])
def test_gradcheck_float64(shape, seed):
    x, w1, w2, b, s, p, d = _inputs(shape, torch.float64, "cpu", requires_grad=True)
    x = x[:1].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w1, w2, b: ops.lowrank_conv2d(x, w1, w2, b, s, p, d), (x, w1, w2, b),
                                    fast_mode=True)


def test_gradients_match_two_convs(seed):
    x, w1, w2, b, s, p, d = _inputs(SHAPES[1], torch.float64, "cpu", requires_grad=True)
    ops.lowrank_conv2d(x, w1, w2, b, s, p, d).square().sum().backward()
    got = [t.grad.clone() for t in (x, w1, w2, b)]
    for t in (x, w1, w2, b):
        t.grad = None
    F.conv2d(F.conv2d(x, w1, None, s, p, d), w2, b).square().sum().backward()
    for g, t in zip(got, (x, w1, w2, b)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(device, bias, channels_last, seed):
    for requires_grad in (False, True):
        args = _inputs(SHAPES[1], torch.float32, device, bias=bias, channels_last=channels_last,
                       requires_grad=requires_grad)
        x, w1, w2, b, s, p, d = args
        torch.library.opcheck(torch.ops.rankprune.lowrank_conv2d.default, (x, w1, w2, b, list(s), list(p), list(d)))


def test_flop_counter_counts_both_convolutions():
    from torch.utils.flop_counter import FlopCounterMode

    x, w1, w2, b, s, p, d = _inputs(SHAPES[0], torch.float32, "cpu")
    with FlopCounterMode(display=False) as fused:
        ops.lowrank_conv2d(x, w1, w2, b, s, p, d)
    with FlopCounterMode(display=False) as pair:
        F.conv2d(F.conv2d(x, w1, None, s, p, d), w2, b)
    assert fused.get_total_flops() == pair.get_total_flops() > 0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(w2=torch.randn(6, 2, 1, 1)), "w2 takes"),
        (dict(w1=torch.randn(3, 5, 3, 3)), "input channels"),
        (dict(w2=torch.randn(6, 3, 3, 3)), r"w2 must be \[N, r, 1, 1\]"),
        (dict(b=torch.randn(5)), "bias must be"),
        (dict(x=torch.randn(2, 4, 7, 6, dtype=torch.float64)), "one dtype"),
        (dict(x=torch.randn(2, 4, 1, 1)), "larger than the padded input"),
        (dict(x=torch.randint(0, 3, (2, 4, 7, 6))), "must be float16"),
    ],
)
def test_bad_arguments(change, match):
    x, w1, w2, b, s, p, d = _inputs(SHAPES[0], torch.float32, "cpu")
    args = dict(x=x, w1=w1, w2=w2, b=b)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.lowrank_conv2d(args["x"], args["w1"], args["w2"], args["b"], s, (0, 0) if "x" in change and
                           change["x"].shape[-1] == 1 else p, d)


def test_bad_stride_type():
    x, w1, w2, b, *_ = _inputs(SHAPES[0], torch.float32, "cpu")
    with pytest.raises(TypeError, match="stride"):
        ops.lowrank_conv2d(x, w1, w2, b, stride=(1, 1, 1))
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        ops.lowrank_conv2d(x, w1, w2, b, stride=0)


@pytest.fixture
def allow_tf32():
    # The fused kernel takes float32 only in TF32, keyed on cuDNN's flag (on by default) like the cuDNN pair.
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c, r, n, hw, stride, bias", [(64, 16, 64, 14, 1, True), (32, 32, 80, 9, 2, False),
                                                       (48, 128, 40, 7, 1, True), (5, 48, 200, 30, 1, True)])
def test_cuda_fused_kernel(dtype, channels_last, c, r, n, hw, stride, bias, monkeypatch, allow_tf32, seed):
    # The fused kernel forced on shapes it covers; tolerance of the dtype's tensor-core arithmetic.
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    x = torch.randn(3, c, hw, hw, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(r, c, 3, 3, device="cuda", dtype=dtype) / (c * 9) ** 0.5
    w2 = torch.randn(n, r, 1, 1, device="cuda", dtype=dtype) / r ** 0.5
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    out = ops.lowrank_conv2d(x, w1, w2, b, stride, 1, 1)
    ref = ops.lowrank_conv2d_reference(x, w1, w2, b, stride, 1, 1)
    tol = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.cuda
@pytest.mark.parametrize("setting", ["auto", "unfused"])
def test_cuda_paths_agree(setting, monkeypatch, seed):
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", setting)
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # "auto" times both paths once
    try:
        for r in (24, 32):  # 24: not covered, always the cuDNN pair
            x = torch.randn(2, 32, 10, 10, device="cuda", dtype=torch.float16)
            w1 = torch.randn(r, 32, 3, 3, device="cuda", dtype=torch.float16) / 17
            w2 = torch.randn(48, r, 1, 1, device="cuda", dtype=torch.float16) / r ** 0.5
            out = ops.lowrank_conv2d(x, w1, w2, None, 1, 1, 1)
            torch.testing.assert_close(out.double(), ops.lowrank_conv2d_reference(x, w1, w2, None, 1, 1, 1),
                                       rtol=2e-2, atol=2e-2)
    finally:
        torch.backends.cudnn.benchmark = old


@pytest.mark.cuda
def test_cuda_forced_fused_refuses_uncovered_shape(monkeypatch):
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    x = torch.randn(1, 8, 5, 5, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="does not cover"):
        ops.lowrank_conv2d(x, torch.randn(24, 8, 3, 3, device="cuda", dtype=torch.float16),
                           torch.randn(8, 24, 1, 1, device="cuda", dtype=torch.float16))
