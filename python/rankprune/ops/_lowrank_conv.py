"""Channel-wise low-rank convolution: a kh x kw convolution C -> r followed by a 1x1 convolution r -> N.

``lowrank_conv2d`` is one op (``rankprune::lowrank_conv2d``): two ATen convolutions on the CPU, one fused
kernel on CUDA where it covers the shape (cuDNN pair otherwise). Autograd is registered here and runs the
standard convolution backward ops, so gradients never depend on the fused kernel.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library  # noqa: F401  (registers the schemas)

IntPair = Union[int, Sequence[int]]


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"rankprune.lowrank_conv2d: {name} must be an int or a pair of ints, got {value!r}")


def lowrank_conv2d(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """``conv2d(conv2d(x, w1, stride, padding, dilation), w2) + bias`` as one op.

    ``x [B, C, H, W]`` (contiguous or channels_last), ``w1 [r, C, kh, kw]``, ``w2 [N, r, 1, 1]``,
    ``bias [N]`` or None, one dtype (float16/bfloat16/float32/float64) and device. Returns ``[B, N, H', W']``
    in the memory format of ``x``. On CUDA it runs two cuDNN convolutions, or the fused kernel (the r-channel
    intermediate on chip) where ``torch.backends.cudnn.benchmark`` timed it faster for the shape and the kernel
    covers it (float16/bfloat16, or float32 with TF32 allowed by ``torch.backends.cudnn.allow_tf32``, the
    default; r a multiple of 16 up to 128); ``RANKPRUNE_LOWRANK_CONV2D=fused`` forces it (docs/lowrank.md).
    Under autocast the operands are cast to the autocast dtype, as ``F.conv2d`` would be.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    args = (x, w1, w2, bias, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"))
    if torch.compiler.is_compiling() or _records_autograd(x, w1, w2, bias):
        return _OP(*args)
    # Inference: below the Python autograd kernel, whose round trip costs about as much as one small convolution
    # (9 us of the op's 25 us per call on a CPU; on an H100 the op ran 15-30 us behind the cuDNN pair it runs,
    # which adds up over a decomposed model's layers in eager mode).
    with torch._C._AutoDispatchBelowAutograd():
        return _OP(*args)


def _records_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_OP = torch.ops.rankprune.lowrank_conv2d.default


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("rankprune::lowrank_conv2d")
def _lowrank_conv2d_fake(x, w1, w2, bias, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"rankprune.lowrank_conv2d: x must be [B, C, H, W], got {tuple(x.shape)}")
    torch._check(w1.dim() == 4, lambda: f"rankprune.lowrank_conv2d: w1 must be [r, C, kh, kw], got {tuple(w1.shape)}")
    torch._check(
        w2.dim() == 4 and w2.shape[2] == 1 and w2.shape[3] == 1,
        lambda: f"rankprune.lowrank_conv2d: w2 must be [N, r, 1, 1], got {tuple(w2.shape)}",
    )
    torch._check(w1.shape[1] == x.shape[1], lambda: "rankprune.lowrank_conv2d: w1 and x disagree on C")
    torch._check(w2.shape[1] == w1.shape[0], lambda: "rankprune.lowrank_conv2d: w2 and w1 disagree on r")
    torch._check(
        x.dtype == w1.dtype == w2.dtype and (bias is None or bias.dtype == x.dtype),
        lambda: "rankprune.lowrank_conv2d: x, w1, w2 and bias must have one dtype",
    )
    h = _out_size(x.shape[2], w1.shape[2], stride[0], padding[0], dilation[0])
    w = _out_size(x.shape[3], w1.shape[3], stride[1], padding[1], dilation[1])
    out = x.new_empty((x.shape[0], w2.shape[0], h, w))
    # The kernels keep the memory format of x (channels_last in, channels_last out).
    return out.contiguous(memory_format=torch._prims_common.suggest_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, w1, w2, bias, stride, padding, dilation = inputs
    ctx.conv_args = (stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w1, w2)


def _backward(ctx, grad):
    # The r-channel intermediate is recomputed rather than kept: it is what the fused forward avoids storing.
    x, w1, w2 = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    need_x, need_w1, need_w2, need_b = ctx.needs_input_grad[:4]
    mid = F.conv2d(x, w1, None, stride, padding, dilation)
    grad_mid, grad_w2, grad_b = torch.ops.aten.convolution_backward.default(
        grad, mid, w2, [w2.shape[0]] if ctx.has_bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [need_x or need_w1, need_w2, need_b and ctx.has_bias],
    )
    grad_x = grad_w1 = None
    if need_x or need_w1:
        grad_x, grad_w1, _ = torch.ops.aten.convolution_backward.default(
            grad_mid, x, w1, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
            [need_x, need_w1, False],
        )
    return grad_x, grad_w1, grad_w2, grad_b, None, None, None


torch.library.register_autograd("rankprune::lowrank_conv2d", _backward, setup_context=_setup_context)


def _register_flop_formula() -> None:
    # FlopCounterMode (and so every FLOP count in rankprune) sees the op as the two convolutions it computes.
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    @register_flop_formula(torch.ops.rankprune.lowrank_conv2d)
    def _flops(x_shape, w1_shape, w2_shape, bias_shape, stride, padding, dilation, *, out_shape, **kwargs):
        mid_shape = (out_shape[0], w1_shape[0], *out_shape[2:])
        return conv_flop_count(x_shape, w1_shape, mid_shape, False) + conv_flop_count(
            mid_shape, w2_shape, out_shape, False
        )


_register_flop_formula()


def lowrank_conv2d_reference(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """float64 reference: the two convolutions with ``F.conv2d`` on float64 copies of the operands."""
    d = torch.float64
    mid = F.conv2d(x.detach().to(d), w1.detach().to(d), None, _pair(stride, "stride"), _pair(padding, "padding"),
                   _pair(dilation, "dilation"))
    return F.conv2d(mid, w2.detach().to(d), None if bias is None else bias.detach().to(d))
