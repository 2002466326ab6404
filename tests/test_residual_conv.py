"""A bottleneck's first 1x1 convolution whose backward adds the shortcut's gradient inside its
input-gradient GEMM (``fastnl._residual_conv``), against float64 and against timm's block."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck

from fastnl import _residual_conv, ops
from fastnl.model import se_bottleneck

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA_TOO = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuBLAS's batched GEMM on a GPU


def _conv_input_grad(dh, weight):
    N, _, H, W = dh.shape
    return torch.ops.aten.convolution_backward(dh, dh.new_empty((N, weight.shape[1], H, W)), weight, None, [1, 1],
                                               [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]


@pytest.mark.parametrize("device", ON_CUDA_TOO)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_plus_the_shortcut_within_twice_plain(dtype, layout, device):
    """One GEMM into g (both maps contiguous or both channels_last) or the convolution's
    gradient then the sum (mixed layouts): within twice plain's error (the convolution's input
    gradient rounded to dtype, then the sum) against float64, batch 1 and 3, odd sizes."""
    for N, Cin, Cout, H, W in [(1, 7, 5, 3, 5), (3, 24, 40, 9, 7)]:
        gen = torch.Generator().manual_seed(N)
        dh64 = torch.randn(N, Cout, H, W, generator=gen, dtype=torch.float64).to(dtype).double()
        w64 = torch.randn(Cout, Cin, 1, 1, generator=gen, dtype=torch.float64).to(dtype).double()
        g64 = (10 * torch.randn(N, Cin, H, W, generator=gen, dtype=torch.float64)).to(dtype).double()
        exact = _conv_input_grad(dh64, w64) + g64
        dh, w, g = (t.to(device, dtype) for t in (dh64, w64, g64))
        plain = (_conv_input_grad(dh, w) + g).cpu()
        cl = torch.channels_last
        if layout == "channels_last":
            dh, g = dh.contiguous(memory_format=cl), g.contiguous(memory_format=cl)
        elif layout == "mixed":
            g = g.contiguous(memory_format=cl)
        g_ptr = g.data_ptr()
        got = _residual_conv.input_grad_plus(dh, w, g)
        assert got.dtype == dtype and got.shape == exact.shape
        assert (got.data_ptr() == g_ptr) == (layout != "mixed")  # the GEMM accumulated into g
        ulp = torch.finfo(dtype).eps
        bound = 2 * (plain.double() - exact).abs().max() + ulp * exact.abs().max()
        assert (got.double().cpu() - exact).abs().max() <= bound
        assert torch.equal(_residual_conv.input_grad_plus(dh, w, None), _conv_input_grad(dh, w))


def _identity_block(channels=16, planes=4):
    torch.manual_seed(0)
    block = Bottleneck(channels, planes, attn_layer="se").to(DEVICE).train()
    return block, copy.deepcopy(block)


@pytest.mark.triton
def test_identity_block_sums_its_input_gradients_in_the_first_convolution(monkeypatch):
    """The fused identity block (the Triton end forced, interpreted on a CPU): the end leaves the
    shortcut's gradient to the first convolution, which adds it in; the block's input and
    parameter gradients are timm's block's."""
    from test_batch_norm_relu import assert_blocks_match

    monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    applied = []
    original = _residual_conv._ConvWithShortcut.apply
    monkeypatch.setattr(_residual_conv._ConvWithShortcut, "apply", lambda *a: applied.append(1) or original(*a))
    block, plain = _identity_block()
    assert se_bottleneck.fuse_se_tails(block) == 1 and block.downsample is None
    x = torch.randn(3, 16, 6, 5, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = block(xa), plain(xb)
    assert applied == [1]
    g = torch.randn_like(out_a)
    with _MapAdds(x.shape) as fused_adds:
        out_a.backward(g, retain_graph=True)
    with _MapAdds(x.shape) as plain_adds:
        out_b.backward(g, retain_graph=True)
    # timm's block adds the input's two gradients (and the SE module's two into its map); ours
    # makes neither add
    assert (fused_adds.count, plain_adds.count) == (0, 2)
    for t in (xa, xb, *block.parameters(), *plain.parameters()):
        t.grad = None
    assert_blocks_match(block, plain, (xa, out_a), (xb, out_b), rtol=1e-4, atol=1e-4)


class _MapAdds:
    """Counts the out-of-place and in-place adds of tensors of one shape (a dispatch mode)."""

    def __init__(self, shape):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.count, shape = 0, tuple(shape)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and \
                        all(isinstance(a, torch.Tensor) and tuple(a.shape) == shape for a in args[:2]):
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.mark.triton
def test_identity_block_with_a_plain_end_adds_nothing_twice(monkeypatch):
    """Where the end does not take the Triton op after all (the shortcut of another dtype than
    the map), the sink stays empty: the convolution's gradient alone, the shortcut's through
    autograd, each counted once."""
    monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    sink = _residual_conv.ShortcutSink()
    block, plain = _identity_block()
    se_bottleneck.fuse_se_tails(block)
    x = torch.randn(2, 16, 4, 4, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    h = _residual_conv.conv_with_shortcut(block.conv1, xa, sink)
    ha = F.conv2d(xb, plain.conv1.weight)
    torch.testing.assert_close(h, ha, rtol=0, atol=0)
    (h.square().sum() + xa.sum()).backward()
    (ha.square().sum() + xb.sum()).backward()
    assert sink.g is None
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block.conv1.weight.grad, plain.conv1.weight.grad, rtol=1e-6, atol=1e-5)


def test_under_autocast_it_computes_as_the_convolution_does():
    """bf16 autocast: the output and both gradients as autocast's convolution gives them (the
    same casts, made by the Function), the weight's gradient in the weight's float32."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 8, 1, bias=False)
    x = torch.randn(2, 12, 5, 3, dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        ha = _residual_conv.conv_with_shortcut(conv, xa, _residual_conv.ShortcutSink())
    weight_grad_a = torch.autograd.grad(ha.float().square().sum(), [xa, conv.weight])
    with torch.autocast("cpu", torch.bfloat16):
        hb = conv(xb)
    weight_grad_b = torch.autograd.grad(hb.float().square().sum(), [xb, conv.weight])
    assert ha.dtype == hb.dtype == torch.bfloat16 and torch.equal(ha, hb)
    for a, b in zip(weight_grad_a, weight_grad_b):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_bad_input_names_the_cause():
    sink = _residual_conv.ShortcutSink()
    with pytest.raises(ValueError, match="1x1, stride-1 Conv2d without bias"):
        _residual_conv.conv_with_shortcut(torch.nn.Conv2d(4, 4, 3), torch.randn(1, 4, 5, 5), sink)
    with pytest.raises(ValueError, match=r"expected x \[N, 4, H, W\]"):
        _residual_conv.conv_with_shortcut(torch.nn.Conv2d(4, 4, 1, bias=False), torch.randn(1, 3, 5, 5), sink)
