"""The fused model's SE bottleneck: the lean SE squeeze (``spatial_mean``) and what it saves."""
import collections
import copy

import pytest
import torch
import torch.utils._python_dispatch
from timm.models.resnet import Bottleneck

from fastnl.benchmarks.step_cost import Roofline
from fastnl.model import se_bottleneck


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_spatial_mean_is_torch_mean_to_the_bit_with_a_broadcast_gradient(dtype, layout):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 3, dtype=dtype).contiguous(memory_format=layout)  # H*W = 21: divisions round
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = se_bottleneck.spatial_mean(xa), xb.mean((2, 3), keepdim=True)
    assert out.dtype == dtype and torch.equal(out, expected)
    grad = torch.randn_like(expected)
    (got,) = torch.autograd.grad(out, xa, grad)
    (want,) = torch.autograd.grad(expected, xb, grad)
    assert got.shape == x.shape and got.dtype == dtype and torch.equal(got, want)
    # a broadcast view of the [3, 5, 1, 1] quotient, not a full-size tensor
    assert got.stride()[2:] == (0, 0) and got.untyped_storage().nbytes() == grad.numel() * grad.element_size()


def test_spatial_mean_names_a_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*\(2, 3, 4\)"):
        se_bottleneck.spatial_mean(torch.zeros(2, 3, 4))


def _bytes_moved(block, x) -> int:
    block.zero_grad(set_to_none=True)  # no accumulation into .grad from an earlier call
    x = x.clone().requires_grad_()
    with Roofline() as roof:
        out = block(x)
        out.backward(torch.ones_like(out))
    return roof.bytes


def test_the_squeeze_gradient_costs_two_passes_of_the_map_less(monkeypatch):
    """One block's forward and backward, priced op by op: with torch's mean, the squeeze's
    gradient is written out at full size, then added to the tail op's (1 + 3 passes of the
    block's output); with ``spatial_mean`` it is added as a broadcast (2 passes)."""
    torch.manual_seed(0)
    block = Bottleneck(256, 64, attn_layer="se")
    assert se_bottleneck.fuse_se_tails(block) == 1 and type(block) is se_bottleneck.FusedSEBottleneck
    x = torch.randn(2, 256, 16, 8)
    lean = _bytes_moved(block, x)
    monkeypatch.setattr(se_bottleneck, "spatial_mean", lambda t: t.mean((2, 3), keepdim=True))
    plain = _bytes_moved(block, x)
    map_bytes = x.numel() * x.element_size()  # the block's output has the input's shape
    assert 1.95 * map_bytes <= plain - lean <= 2.05 * map_bytes


def _downsampling_pair(index=3, seed=0):
    """(fused, timm) copies of one downsampling block of the model (3: layer2's first, stride
    2; 0: layer1's, stride 1), float64, BatchNorms awake."""
    from timm.models.resnet import Bottleneck as TimmBottleneck

    from fastnl.model import build_model

    torch.manual_seed(seed)
    fused = build_model(10, impl="fused", verbose=False)
    plain = build_model(10, impl="reference", verbose=False)
    fb = [m for m in fused.backbone.modules() if isinstance(m, TimmBottleneck)][index].double()
    pb = [m for m in plain.backbone.modules() if isinstance(m, TimmBottleneck)][index].double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in fb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64) * 0.1)
    pb.load_state_dict(fb.state_dict())
    return fb, pb


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("batch,h,w", [(1, 9, 5), (3, 8, 4)])
@pytest.mark.parametrize("index,stride", [(3, 2), (0, 1)], ids=["layer2-stride2", "layer1-stride1"])
def test_downsampling_block_matches_timm_in_float64(layout, batch, h, w, device, index, stride):
    """layer2's first block (a stride-2 shortcut convolution) and layer1's (stride 1): output,
    input gradient, every parameter's gradient and the running statistics the timm block's to
    float64 rounding, odd maps (the grid's last row and column) and batch 1 included."""
    fb, pb = (b.to(device) for b in _downsampling_pair(index))
    assert fb._meeting(torch.zeros(1, requires_grad=True)) is not None
    assert fb.downsample[0].stride == (stride, stride)
    x = torch.randn(batch, fb.conv1.in_channels, h, w, dtype=torch.float64).to(device).to(memory_format=layout)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = fb(xa), pb(xb)
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    g = torch.randn(out_a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    out_a.backward(g)
    out_b.backward(g)
    assert xb.grad.abs().max() > 0
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    for (name, pa), pb_ in zip(fb.named_parameters(), pb.parameters()):
        torch.testing.assert_close(pa.grad, pb_.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, ba), bb in zip(fb.named_buffers(), pb.buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("index,saved_passes", [(3, 3 - 0.25), (0, 3)], ids=["layer2-stride2", "layer1-stride1"])
def test_downsampling_block_adds_the_shortcut_gradient_on_its_grid_only(index, saved_passes):
    """Plain autograd writes the strided shortcut's input gradient at full size and adds two
    full-size gradients; the fused block writes it on the stride-2 grid and adds it there:
    no full-size add, the shortcut's gradient a quarter of the map, and fewer bytes priced by
    the step-cost roofline by at least three passes over the input less a quarter. At stride 1
    (layer1) the second convolution's GEMM adds into the first's gradient: three passes fewer."""
    fb, pb = _downsampling_pair(index)
    x = torch.randn(2, fb.conv1.in_channels, 8, 4, dtype=torch.float64)
    counts, moved = [], []
    for block in (fb, pb):
        xx = x.clone().requires_grad_()
        out = block(xx)
        seen = collections.Counter()

        class Spy(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                res = func(*args, **(kwargs or {}))
                outs = res if isinstance(res, (tuple, list)) else (res,)
                if any(isinstance(t, torch.Tensor) and t.shape == x.shape for t in outs):
                    seen[func._overloadpacket.__name__] += 1
                return res

        with Spy(), Roofline() as roof:
            out.backward(torch.ones_like(out))
        counts.append(seen)
        moved.append(roof.bytes)
    fused, plain = counts
    # (at stride 1 conv2's and conv3's inputs have x's shape too: counted in both)
    assert plain["add"] == 1 and fused["add"] == 0
    assert plain["convolution_backward"] - fused["convolution_backward"] == 1
    if index == 3:
        assert plain["convolution_backward"] == 2
    map_bytes = x.numel() * x.element_size()
    assert moved[1] - moved[0] >= saved_passes * map_bytes


@pytest.mark.parametrize("grid_first", [True, False])
def test_grad_meeting_sums_whichever_backward_runs_second(grid_first):
    from fastnl._residual_conv import GradMeeting

    dense = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    grid = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    expected = dense.clone()
    expected[:, :, ::2, ::2] += grid
    meeting = GradMeeting(2)
    first, second = ({"grid": grid}, {"dense": dense.clone()}) if grid_first else ({"dense": dense.clone()},
                                                                                 {"grid": grid})
    assert meeting.meet(**first) is None
    total = meeting.meet(**second)
    assert torch.equal(total, expected)
    assert meeting.dense is None and meeting.grid is None


def test_meeting_conv_rejects_other_convolutions():
    from fastnl._residual_conv import GradMeeting, meeting_conv

    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="stride 1 or 2"):
        meeting_conv(torch.nn.Conv2d(4, 8, 3, bias=False), x, GradMeeting(2))
    with pytest.raises(ValueError, match="stride 1 or 2"):
        meeting_conv(torch.nn.Conv2d(4, 8, 1, stride=3, bias=False), x, GradMeeting(2))
    with pytest.raises(ValueError, match=r"expected x \[N, 8, H, W\]"):
        meeting_conv(torch.nn.Conv2d(8, 8, 1, bias=False), x, GradMeeting(2))


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("index", [3, 0], ids=["layer2-stride2", "layer1-stride1"])
def test_downsampling_block_applies_its_shortcut_batch_norm_in_the_end_op(monkeypatch, index, device):
    """With the Triton BatchNorm kernels (interpreted here, as on CUDA), a downsampling block's
    shortcut BatchNorm runs inside the bottleneck end's op (``shortcut_norm``), not as a module:
    no torch BatchNorm runs, its batch is counted once; in float32 the output, the input
    gradient, every parameter's gradient and the running statistics within twice the timm
    block's float32 error against float64 (one float32 ulp of the magnitude as a floor)."""
    from fastnl import ops

    fb64, pb64 = (b.to(device) for b in _downsampling_pair(index))
    fb, pb = (copy.deepcopy(b).float() for b in (fb64, pb64))
    x64 = torch.randn(2, fb.conv1.in_channels, 9, 5, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        shape = copy.deepcopy(pb64)(x64).shape
    g64 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(device)

    def run(block, x, g, triton):
        xx = x.clone().requires_grad_()
        seen = collections.Counter()
        if triton:
            monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
        original = ops.bn_se_residual_relu
        monkeypatch.setattr(ops, "bn_se_residual_relu",
                            lambda *a, **k: seen.update(norm=k.get("shortcut_norm") is not None) or original(*a, **k))
        out = block(xx)
        out.backward(g)
        monkeypatch.undo()
        return [out, xx.grad, *(p.grad for p in block.parameters()), *block.buffers()], seen

    exact, _ = run(pb64, x64, g64, False)
    plain, _ = run(pb, x64.float(), g64.float(), False)
    ours, seen = run(fb, x64.float(), g64.float(), True)
    assert seen["norm"] == 1
    assert int(fb.downsample[1].num_batches_tracked) == int(pb.downsample[1].num_batches_tracked) == 1
    names = ["out", "grad_x", *(f"grad {n}" for n, _ in fb.named_parameters()), *(n for n, _ in fb.named_buffers())]
    for name, e, lo, o in zip(names, exact, plain, ours, strict=True):
        if not e.is_floating_point():
            assert torch.equal(o, lo), name
            continue
        ours_err = (o.double() - e).abs().max().item()
        plain_err = (lo.double() - e).abs().max().item()
        floor = torch.finfo(torch.float32).eps * e.abs().max().item()
        assert ours_err <= max(2 * plain_err, floor), f"{name}: {ours_err:.3g} vs plain {plain_err:.3g}"
