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

The non-local blocks (NLAM, NLTP) use the same GEMMs for several 1x1 projections with biases,
stacked (:func:`projection_with_residual`): their residual sum (:func:`residual_to_sink`)
leaves the input's gradient in a sink that it does not own (autograd hands the same tensor to
the other branch), so the GEMM writes the sum to a new tensor, reading that gradient as its
addend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class ShortcutSink:
    """The shortcut's gradient g, left by the block's end for the block's first convolution.
    ``owned``: g is a fresh tensor that nothing reads after the end's backward, so the
    convolution's GEMM may accumulate into it; otherwise it writes the sum to a new tensor
    (the same passes over the map: g read once, the sum written once)."""

    __slots__ = ("g", "owned")

    def __init__(self, owned: bool = True):
        self.g = None
        self.owned = owned


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of x runs in: autocast's where it is on (as F.conv2d would cast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _cast_conv1x1(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> tuple:
    """(xc, wc, conv2d(xc, wc, stride=stride)): x and the weight cast as autocast would cast
    them for a convolution (no copy where they are in that dtype already), the convolution run
    without autocast."""
    dtype = _compute_dtype(x)
    xc, wc = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return xc, wc, F.conv2d(xc, wc, stride=stride)


def _conv1x1_backward(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: list, stride: int = 1) -> tuple:
    """aten's convolution backward of ``conv2d(x, weight[, bias], stride=stride)`` (1x1) for the
    gradients ``mask`` asks for ([input, weight, bias])."""
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(dh, x, weight, bias_sizes, [stride, stride], [0, 0], [1, 1], False,
                                               [0, 0], 1, mask)


def input_grad_plus(dh: torch.Tensor, weight: torch.Tensor, g: torch.Tensor | None,
                    overwrite: bool = True) -> torch.Tensor:
    """``conv1x1_input_grad(dh, weight) + g`` ([N, Cout, H, W] dh, [Cout, Cin, 1, 1] weight, g
    [N, Cin, H, W] or None), in dh's dtype: where g and dh are both contiguous or both
    channels_last and of dh's dtype, as one GEMM accumulating into g (``overwrite``: g is
    overwritten; otherwise the sum is a new tensor, the GEMM reading g as its addend);
    otherwise the convolution's input gradient, then the sum."""
    N, Cout, H, W = dh.shape
    Cin = weight.shape[1]
    w2d = weight.reshape(Cout, Cin)
    if g is not None and g.dtype == dh.dtype and tuple(g.shape) == (N, Cin, H, W):
        if g.is_contiguous() and dh.is_contiguous():
            # per image: g[n] (Cin x HW) += W^T (Cin x Cout) @ dh[n] (Cout x HW), W^T broadcast
            g3, wt, dh3 = g.view(N, Cin, H * W), w2d.t().expand(N, Cin, Cout), dh.view(N, Cout, H * W)
            if overwrite:
                g3.baddbmm_(wt, dh3)
                return g
            return torch.baddbmm(g3, wt, dh3).view(N, Cin, H, W)
        cl = torch.channels_last
        if g.is_contiguous(memory_format=cl) and dh.is_contiguous(memory_format=cl):
            # positions as rows: g (N H W x Cin) += dh (N H W x Cout) @ W (Cout x Cin)
            g2, dh2 = g.permute(0, 2, 3, 1).reshape(-1, Cin), dh.permute(0, 2, 3, 1).reshape(-1, Cout)
            if overwrite:
                g2.addmm_(dh2, w2d)
                return g
            return torch.addmm(g2, dh2, w2d).view(N, H, W, Cin).permute(0, 3, 1, 2)
    dx = _conv1x1_backward(dh, dh.new_empty((N, Cin, H, W)), weight, [True, False, False])[0]
    return dx if g is None else dx + g


class _ConvWithShortcut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, sink):
        xc, wc, h = _cast_conv1x1(x, weight)  # autocast's casts, made here
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
            dx = input_grad_plus(dh, wc, None if g is None else g.to(dh.dtype), overwrite=ctx.sink.owned).to(ctx.x_dtype)
        elif g is not None:
            raise RuntimeError("conv_with_shortcut: the shortcut has a gradient but the input needs none")
        if ctx.needs_input_grad[1]:
            dweight = _conv1x1_backward(dh, xc, wc, [False, True, False])[1].to(ctx.weight_dtype)
        return dx, dweight, None


class _ResidualToSink(torch.autograd.Function):
    """z + x whose gradient for x is left in a sink (for the convolution of x that adds it in
    its backward GEMM) instead of being returned to autograd."""

    @staticmethod
    def forward(ctx, z, x, sink):
        ctx.sink, ctx.z_dtype = sink, z.dtype
        return z + x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if ctx.needs_input_grad[1]:
            ctx.sink.g = g
        return (g.to(ctx.z_dtype) if ctx.needs_input_grad[0] else None), None, None


def _bare_1x1(conv: torch.nn.Module) -> bool:
    """An ``nn.Conv2d``, 1x1, no padding, dilation 1, one group, no bias (any stride)."""
    return (type(conv) is torch.nn.Conv2d and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None and conv.padding_mode == "zeros")


def plain_1x1(conv: torch.nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` that :func:`conv_with_shortcut` computes: 1x1, stride
    1, no padding, dilation 1, one group, no bias."""
    return _bare_1x1(conv) and conv.stride == (1, 1)


def conv_with_shortcut(conv: torch.nn.Module, x: torch.Tensor, sink: ShortcutSink) -> torch.Tensor:
    """``conv(x)`` (a :func:`plain_1x1` convolution) whose backward adds the gradient that the
    block's end leaves in ``sink`` (the shortcut's, x being the shortcut) into the GEMM of x's
    gradient. x: [N, Cin, H, W]."""
    if not plain_1x1(conv):
        raise ValueError(f"conv_with_shortcut needs a 1x1, stride-1 Conv2d without bias, got {conv}")
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"conv_with_shortcut: expected x [N, {conv.in_channels}, H, W], got {tuple(x.shape)}")
    return _ConvWithShortcut.apply(x, conv.weight, sink)


def residual_to_sink(z: torch.Tensor, x: torch.Tensor, sink: ShortcutSink) -> torch.Tensor:
    """``z + x`` whose gradient for ``x`` goes to ``sink`` (not owned: autograd hands the same
    tensor to z's branch), for :func:`projection_with_residual` of the same x to add in. Autograd
    then receives x's gradient from that projection alone, so the projection's backward must
    run whenever this one does: x's every use but this sum is through it (it always is where
    the sum's output depends on the projection, as in a non-local block)."""
    if sink.owned:
        raise ValueError("residual_to_sink needs a ShortcutSink(owned=False): z's branch reads the same gradient")
    return _ResidualToSink.apply(z, x, sink)


class _StackedProjection(torch.autograd.Function):
    """1x1 convolution of x by several weights stacked along Cout (and their biases, None where
    one has none), whose backward adds the sink's gradient into x's. Backward keeps x and the
    stacked weight (a copy of the weights: 2 bytes per weight in bf16; concatenating them again
    in backward would read and write them once more each step)."""

    @staticmethod
    def forward(ctx, x, sink, n, *tensors):
        weights, biases = tensors[:n], tensors[n:]
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        wc = [w.to(dtype) for w in weights]  # autocast's casts, made here (none where cast already)
        stacked = torch.cat(wc)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([torch.zeros(w.shape[0], dtype=dtype, device=w.device) if b is None else b.to(dtype)
                              for w, b in zip(wc, biases)])
        with torch.autocast(x.device.type, enabled=False):
            h = F.conv2d(xc, stacked, bias)
        ctx.save_for_backward(xc, stacked)
        ctx.sink, ctx.n, ctx.x_dtype = sink, n, x.dtype
        ctx.sizes = [w.shape[0] for w in wc]
        ctx.weight_dtypes = [w.dtype for w in weights]
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        xc, stacked = ctx.saved_tensors
        sink, n, sizes = ctx.sink, ctx.n, ctx.sizes
        g, sink.g = sink.g, None
        want_x = ctx.needs_input_grad[0]
        want_w = any(ctx.needs_input_grad[3:3 + n])
        want_b = any(need and dt is not None for need, dt in zip(ctx.needs_input_grad[3 + n:], ctx.bias_dtypes))
        dx = None
        if want_x:
            if g is not None:
                g = g.to(dh.dtype).reshape(xc.shape)  # a residual's gradient comes in its own shape
            dx = input_grad_plus(dh, stacked, g, overwrite=sink.owned).to(ctx.x_dtype)
        elif g is not None:
            raise RuntimeError("projection_with_residual: the residual has a gradient but the input needs none")
        dweights, dbiases = [None] * n, [None] * n
        if want_w or want_b:
            _, dw, db = _conv1x1_backward(dh, xc, stacked, [False, want_w, want_b])
            if want_w:
                dweights = [d.to(dt) if need else None for d, dt, need in
                            zip(dw.split(sizes), ctx.weight_dtypes, ctx.needs_input_grad[3:3 + n])]
            if want_b:
                dbiases = [d.to(dt) if need and dt is not None else None for d, dt, need in
                           zip(db.split(sizes), ctx.bias_dtypes, ctx.needs_input_grad[3 + n:])]
        return (dx, None, None, *dweights, *dbiases)


def projection_with_residual(x: torch.Tensor, weights, biases, sink: ShortcutSink) -> torch.Tensor:
    """``conv2d(x, cat(weights), cat(biases))``: several 1x1 projections of x stacked along the
    output channels (weights [Cout_i, Cin, 1, 1]; biases [Cout_i] or None each), whose
    backward makes x's gradient in one GEMM, accumulating the gradient that
    :func:`residual_to_sink` left in ``sink`` for the same x. Where a block projects x three
    times and adds x to its output (a non-local block's query, key and value), plain autograd
    runs three input-gradient GEMMs and three adds of map-sized gradients; this runs one GEMM
    and no add (and one GEMM for the weights, one reduction for the biases). x: [N, Cin, H, W]."""
    weights, biases = list(weights), list(biases)
    if not weights or len(biases) != len(weights):
        raise ValueError(f"projection_with_residual: one bias (or None) per weight, got {len(weights)} weights "
                         f"and {len(biases)} biases")
    if x.dim() != 4:
        raise ValueError(f"projection_with_residual: expected x [N, Cin, H, W], got {tuple(x.shape)}")
    for w, b in zip(weights, biases):
        if w.dim() != 4 or tuple(w.shape[1:]) != (x.shape[1], 1, 1):
            raise ValueError(f"projection_with_residual: expected weights [Cout, {x.shape[1]}, 1, 1], "
                             f"got {tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"projection_with_residual: bias must be [{w.shape[0]}], got {tuple(b.shape)}")
    return _StackedProjection.apply(x, sink, len(weights), *weights, *biases)


class GradMeeting:
    """A downsampling bottleneck's input x feeds two 1x1 convolutions: the first convolution
    (stride 1: a dense gradient of x) and the shortcut's (stride s: a gradient at one of every
    s x s positions). Plain autograd has the shortcut's convolution write its gradient at full
    size, zeros between the grid positions, and adds the two full-size tensors (four passes
    over the map). Here the shortcut's backward makes its gradient on the grid only, and
    whichever of the two backwards runs second adds it into the dense gradient's grid
    positions in place (the dense one is a fresh tensor) and returns the sum; the first
    returns none. A quarter of a pass at s = 2 instead of four passes; the same sums, rounded
    once. With s = 1 (layer1's first block: both gradients dense) the second backward's GEMM
    accumulates into the first's gradient (:func:`input_grad_plus`): no pass at all."""

    __slots__ = ("stride", "dense", "grid")

    def __init__(self, stride: int):
        self.stride, self.dense, self.grid = int(stride), None, None

    def meet(self, dense: torch.Tensor | None = None, grid: torch.Tensor | None = None) -> torch.Tensor | None:
        if dense is not None:
            self.dense = dense
        if grid is not None:
            self.grid = grid
        if self.dense is None or self.grid is None:
            return None
        total, grid = self.dense, self.grid
        self.dense = self.grid = None
        s = self.stride
        total[:, :, ::s, ::s] += grid.to(total.dtype)
        return total


    def take(self) -> torch.Tensor | None:
        """(s = 1) The gradient the first backward left, or None (this is the first)."""
        dense, self.dense = self.dense, None
        return dense


class _MeetingConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, meeting, stride):
        xc, wc, h = _cast_conv1x1(x, weight, stride)  # autocast's casts, made here
        ctx.save_for_backward(xc, wc)
        ctx.meeting, ctx.stride, ctx.x_dtype, ctx.weight_dtype = meeting, stride, x.dtype, weight.dtype
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        xc, wc = ctx.saved_tensors
        s = ctx.stride
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dweight = None
        if s == 1 and ctx.meeting.stride == 1:
            if want_w:
                dweight = _conv1x1_backward(dh, xc, wc, [False, True, False])[1]
            if want_x:
                first = ctx.meeting.take()
                if first is None:  # the first of the two: leave the gradient to the second
                    ctx.meeting.dense = _conv1x1_backward(dh, xc, wc, [True, False, False])[0]
                else:  # the second: its GEMM adds into the first's (a fresh tensor)
                    dx = input_grad_plus(dh, wc, first.to(dh.dtype), overwrite=True)
        elif s == 1:
            dx, dweight, _ = _conv1x1_backward(dh, xc, wc, [want_x, want_w, False])
            if want_x:
                dx = ctx.meeting.meet(dense=dx)
        else:
            if want_x:
                n, _, ho, wo = dh.shape
                grid = _conv1x1_backward(dh, dh.new_empty((n, xc.shape[1], ho, wo)), wc, [True, False, False])[0]
                dx = ctx.meeting.meet(grid=grid)
            if want_w:
                dweight = _conv1x1_backward(dh, xc, wc, [False, True, False], stride=s)[1]
        return (None if dx is None else dx.to(ctx.x_dtype)), \
            (None if dweight is None else dweight.to(ctx.weight_dtype)), None, None


def strided_1x1(conv: torch.nn.Module) -> bool:
    """Whether ``conv`` is a downsampling shortcut's convolution that :func:`meeting_conv`
    computes: an ``nn.Conv2d``, 1x1, stride s > 1 the same both ways, no padding, dilation 1,
    one group, no bias."""
    return _bare_1x1(conv) and conv.stride[0] == conv.stride[1] > 1


def meeting_conv(conv: torch.nn.Module, x: torch.Tensor, meeting: GradMeeting) -> torch.Tensor:
    """``conv(x)`` for a :func:`plain_1x1` or :func:`strided_1x1` convolution whose backward
    meets the other convolution of the same x in ``meeting`` (one of each, the strided one's
    stride the meeting's; with a stride-1 meeting two :func:`plain_1x1` ones). x: [N, Cin, H, W]."""
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"meeting_conv: expected x [N, {conv.in_channels}, H, W], got {tuple(x.shape)}")
    if plain_1x1(conv):
        stride = 1
    elif strided_1x1(conv) and conv.stride[0] == meeting.stride:
        stride = meeting.stride
    else:
        raise ValueError(f"meeting_conv needs a 1x1 Conv2d without bias, stride 1 or {meeting.stride}, got {conv}")
    return _MeetingConv.apply(x, conv.weight, meeting, stride)
