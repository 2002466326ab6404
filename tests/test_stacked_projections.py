"""The non-local blocks' stacked projections (``fastnl._residual_conv.projection_with_residual``
and ``residual_to_sink``): the NLAM's a, b, d and NLTP's theta, phi, g as one 1x1 GEMM whose
backward adds the residual's gradient of the block input, in the fused model."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnl._residual_conv import ShortcutSink, input_grad_plus, projection_with_residual, residual_to_sink
from fastnl.model.nlam import NLAM
from fastnl.model.temporal import NLTP


class _MapOps(TorchDispatchMode):
    """Counts the ops whose output has at least ``numel`` elements (map-sized)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.counts = numel, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in outs):
            self.counts[func._overloadpacket.__name__] += 1
        return out


def _blocks(kind, channels, dtype=torch.float64, seed=0):
    """(unstacked, stacked) copies of one block with the same parameters, BatchNorm awake."""
    torch.manual_seed(seed)
    if kind == "nlam":
        block = NLAM(channels, reduction=4, impl="fused")
        bn = block.w0_bn
    else:
        block = NLTP(channels, stacked_projections=True)
        bn = block.w_bn
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    block = block.to(dtype)
    other = NLAM(channels, reduction=4, impl="fused") if kind == "nlam" else NLTP(channels)
    other = other.to(dtype)
    other.load_state_dict(block.state_dict())
    other.stacked_projections = False
    assert block.stacked_projections
    return other, block


def _step(block, x, frames, weight=None):
    x = x.clone().requires_grad_()
    out = block(x, frames)
    weight = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(out.device) \
        if weight is None else weight
    (out.double() * weight).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in block.parameters()], weight


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["nlam", "nltp"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("clips,frames,h,w", [(1, 3, 5, 3), (2, 2, 3, 1)])
def test_stacked_block_matches_unstacked_in_float64(kind, channels_last, clips, frames, h, w, device):
    """Output, input gradient and every parameter's gradient (the three projections' weights
    and biases, W0/W and its BatchNorm, the MLP) the unstacked block's to float64 rounding,
    batch 1 and 2, odd maps, both layouts."""
    plain, stacked = (b.to(device) for b in _blocks(kind, 16))
    x = torch.randn(clips * frames, 16, h, w, dtype=torch.float64).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    expected, weight = _step(plain, x, frames)
    got, _ = _step(stacked, x, frames, weight)
    assert len(got) == len(expected) == 2 + len(list(plain.parameters()))
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        scale = e.abs().max().item()
        assert scale > 0
        assert (g - e).abs().max().item() <= 1e-12 * max(scale, 1.0)


@pytest.mark.parametrize("kind", ["nlam", "nltp"])
def test_stacked_backward_makes_the_input_gradient_in_one_gemm_and_no_add(kind):
    """Unstacked: three input-gradient convolutions and three adds of map-sized gradients
    (three projections and the residual); stacked: one batched GEMM that adds the residual's
    gradient, no map-sized add."""
    plain, stacked = _blocks(kind, 16)
    x = torch.randn(6, 16, 4, 3, dtype=torch.float64)
    counts = []
    for block in (plain, stacked):
        xx = x.clone().requires_grad_()
        out = block(xx, 3)
        with _MapOps(x.numel()) as ops:
            out.sum().backward()
        counts.append(ops.counts)
    unstacked, fused = counts
    assert unstacked["add"] == 3 and unstacked["convolution_backward"] >= 3
    assert fused["add"] == 0
    assert fused["baddbmm"] == 1


@pytest.mark.parametrize("kind", ["nlam", "nltp"])
def test_stacked_block_under_bf16_autocast_is_as_accurate_as_unstacked(kind):
    """bf16 autocast on a CPU: the stacked block's output and gradients no further from the
    float64 block's than twice the unstacked block's (worst of three seeds)."""
    worst = {}
    for seed in range(3):
        plain64, _ = _blocks(kind, 32, seed=seed)
        plain, stacked = _blocks(kind, 32, torch.float32, seed=seed)
        x = torch.randn(6, 32, 4, 2, generator=torch.Generator().manual_seed(seed + 10))
        truth, weight = _step(plain64, x.double(), 3)
        for name, block in (("plain", plain), ("stacked", stacked)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, _ = _step(block, x, 3, weight)
            for i, (g, t) in enumerate(zip(got, truth)):
                if t.abs().max() == 0:
                    continue
                err = ((g.double() - t).norm() / t.norm()).item()
                worst[name, i] = max(worst.get((name, i), 0.0), err)
    items = sorted({i for _, i in worst})
    assert len(items) >= 8
    for i in items:
        assert worst["stacked", i] <= 2 * worst["plain", i] + 1e-6, (i, worst["stacked", i], worst["plain", i])


@pytest.mark.parametrize("channels_last", [False, True])
def test_input_grad_plus_without_overwrite_keeps_g(channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dh = torch.randn(2, 6, 3, 5, dtype=torch.float64).to(memory_format=fmt)
    g = torch.randn(2, 4, 3, 5, dtype=torch.float64).to(memory_format=fmt)
    weight = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    g0 = g.clone()
    expected = torch.nn.grad.conv2d_input(g.shape, weight, dh) + g0
    out = input_grad_plus(dh, weight, g, overwrite=False)
    assert torch.equal(g, g0) and out.data_ptr() != g.data_ptr()
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    out = input_grad_plus(dh, weight, g, overwrite=True)
    assert out.data_ptr() == g.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


def test_projection_and_residual_reject_what_they_cannot_compute():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"weights \[Cout, 4, 1, 1\]"):
        projection_with_residual(x, [torch.randn(6, 4, 3, 3)], [None], ShortcutSink(owned=False))
    with pytest.raises(ValueError, match=r"bias must be \[6\]"):
        projection_with_residual(x, [torch.randn(6, 4, 1, 1)], [torch.randn(5)], ShortcutSink(owned=False))
    with pytest.raises(ValueError, match="one bias"):
        projection_with_residual(x, [torch.randn(6, 4, 1, 1)], [], ShortcutSink(owned=False))
    with pytest.raises(ValueError, match="owned=False"):
        residual_to_sink(x, x, ShortcutSink())


def test_frozen_input_drops_the_residual_gradient_and_still_trains_the_weights():
    """x without a gradient: the sink stays empty and the projection's weight and bias gradients
    are the unstacked convolutions'."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    weight = torch.randn(6, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    sink = ShortcutSink(owned=False)
    h = projection_with_residual(x, [weight[:2], weight[2:]], [bias[:2], bias[2:]], sink)
    z = h[:, :4]
    out = residual_to_sink(z, x, sink)
    out.square().sum().backward()
    assert sink.g is None
    assert weight.grad.abs().sum() > 0
    w2, b2 = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    h2 = torch.nn.functional.conv2d(x, w2, b2)
    (h2[:, :4] + x).square().sum().backward()
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-13, atol=1e-13)
