"""A bottleneck's first 1x1 convolution when its shortcut is its input itself (no downsampling):
the gradient of that input is the convolution's input gradient plus the shortcut's, and here
the sum is made inside the GEMM that computes the first.

Plain autograd writes the convolution's input gradient (one pass over the map), then adds the
shortcut's gradient to it (reads both, writes the sum: three passes). ``_ConvWithShortcut``'s
backward multiplies straight into the shortcut's gradient (``baddbmm_``/``addmm_`` with
beta = 1, which reads it once and writes it once): two passes instead of four, one launch
instead of two, and one rounding of the sum to the map's dtype instead of two.

The shortcut's gradient comes from the block's end (``fastnl._bn_se_tail._Tail``), which
leaves it in a :class:`ShortcutSink` instead of returning it to autograd, and returns none for
the shortcut: autograd then has one gradient for the block's input, this one. Where the end
returns the shortcut's gradient to autograd after all (another backend), the sink stays empty
and the backward is the convolution's alone, which autograd adds to it as usual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class ShortcutSink:
    """The shortcut's gradient g, left by the block's end for the block's first convolution
    (it owns g: a fresh tensor that nothing reads after the end's backward)."""

    __slots__ = ("g",)

    def __init__(self):
        self.g = None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of x runs in: autocast's where it is on (as F.conv2d would cast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _conv1x1_backward(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: list) -> tuple:
    """aten's convolution backward of ``conv2d(x, weight)`` (1x1, stride 1, no bias) for the
    gradients ``mask`` asks for ([input, weight, bias])."""
    return torch.ops.aten.convolution_backward(dh, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)


def input_grad_plus(dh: torch.Tensor, weight: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """``conv1x1_input_grad(dh, weight) + g`` ([N, Cout, H, W] dh, [Cout, Cin, 1, 1] weight, g
    [N, Cin, H, W] or None), in dh's dtype: where g and dh are both contiguous or both
    channels_last and of dh's dtype, as one GEMM accumulating into g (g is overwritten);
    otherwise the convolution's input gradient, then the sum."""
    N, Cout, H, W = dh.shape
    Cin = weight.shape[1]
    w2d = weight.reshape(Cout, Cin)
    if g is not None and g.dtype == dh.dtype and tuple(g.shape) == (N, Cin, H, W):
        if g.is_contiguous() and dh.is_contiguous():
            # per image: g[n] (Cin x HW) += W^T (Cin x Cout) @ dh[n] (Cout x HW), W^T broadcast
            g.view(N, Cin, H * W).baddbmm_(w2d.t().expand(N, Cin, Cout), dh.view(N, Cout, H * W))
            return g
        cl = torch.channels_last
        if g.is_contiguous(memory_format=cl) and dh.is_contiguous(memory_format=cl):
            # positions as rows: g (N H W x Cin) += dh (N H W x Cout) @ W (Cout x Cin)
            g.permute(0, 2, 3, 1).reshape(-1, Cin).addmm_(dh.permute(0, 2, 3, 1).reshape(-1, Cout), w2d)
            return g
    dx = _conv1x1_backward(dh, dh.new_empty((N, Cin, H, W)), weight, [True, False, False])[0]
    return dx if g is None else dx + g


class _ConvWithShortcut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, sink):
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)  # autocast's casts, made here
        with torch.autocast(x.device.type, enabled=False):
            h = F.conv2d(xc, wc)
        ctx.save_for_backward(xc, wc)
        ctx.sink, ctx.x_dtype, ctx.weight_dtype = sink, x.dtype, weight.dtype
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        xc, wc = ctx.saved_tensors
        g, ctx.sink.g = ctx.sink.g, None
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            dx = input_grad_plus(dh, wc, None if g is None else g.to(dh.dtype)).to(ctx.x_dtype)
        elif g is not None:
            raise RuntimeError("conv_with_shortcut: the shortcut has a gradient but the input needs none")
        if ctx.needs_input_grad[1]:
            dweight = _conv1x1_backward(dh, xc, wc, [False, True, False])[1].to(ctx.weight_dtype)
        return dx, dweight, None


def plain_1x1(conv: torch.nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` that :func:`conv_with_shortcut` computes: 1x1, stride
    1, no padding, dilation 1, one group, no bias."""
    return (type(conv) is torch.nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
            and conv.padding_mode == "zeros")


def conv_with_shortcut(conv: torch.nn.Module, x: torch.Tensor, sink: ShortcutSink) -> torch.Tensor:
    """``conv(x)`` (a :func:`plain_1x1` convolution) whose backward adds the gradient that the
    block's end leaves in ``sink`` (the shortcut's, x being the shortcut) into the GEMM of x's
    gradient. x: [N, Cin, H, W]."""
    if not plain_1x1(conv):
        raise ValueError(f"conv_with_shortcut needs a 1x1, stride-1 Conv2d without bias, got {conv}")
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"conv_with_shortcut: expected x [N, {conv.in_channels}, H, W], got {tuple(x.shape)}")
    return _ConvWithShortcut.apply(x, conv.weight, sink)
