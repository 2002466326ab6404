"""The channel-attention extension (paper eq. 3) against the float64 plain-PyTorch reference.

Low-precision results are held to twice the reference's own error in that dtype (both
measured against the float64 reference on the same rounded inputs), plus one ulp of the
result's magnitude.
"""
import pytest
import torch

from fastnl import _extension, ops, reference

pytestmark = pytest.mark.skipif(not _extension.available(), reason="fastnl._C extension is not built")

# (B, N, C, H, W, R): C not a multiple of 32, N = 1, H*W = 1, R = 1, both real H x W shapes.
SHAPES = [
    (2, 3, 20, 5, 7, 4),
    (2, 1, 33, 1, 1, 1),
    (1, 4, 64, 16, 8, 4),
    (3, 2, 48, 8, 4, 3),
]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "frame_channels_last", "channels_last_3d", "strided"]


def _ops():
    return _extension.load()


def _distinct_x(B, N, C, H, W, generator):
    """x whose values are distinct within every (b, n, c) frame map and exact in bf16/fp16
    (multiples of 1/16 below 8 in magnitude), so that no max over positions is tied."""
    HW = H * W
    keys = torch.rand(B, N, C, 2 * HW, generator=generator)
    picks = keys.argsort(dim=-1)[..., :HW].to(torch.float64)
    return ((picks - HW) / 16.0).reshape(B, N, C, H, W)


def _layout(x, layout):
    if layout == "contiguous":
        return x.contiguous()
    if layout == "frame_channels_last":  # a channels_last [B*N, C, H, W] map, viewed as 5-d
        return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    big = torch.cat([x, x], dim=2)  # a non-dense view: every other channel block
    return big[:, :, : x.shape[2]]


def _inputs(shape, dtype, *, bias=True, seed=0, layout="contiguous"):
    B, N, C, H, W, R = shape
    gen = torch.Generator().manual_seed(seed)
    x = _layout(_distinct_x(B, N, C, H, W, gen), layout).to(dtype)
    w1 = (torch.randn(R, C, generator=gen, dtype=torch.float64) / C**0.5).to(dtype)
    w2 = (torch.randn(C, R, generator=gen, dtype=torch.float64) / R**0.5).to(dtype)
    b1 = (0.1 * torch.randn(R, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    b2 = (0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    return x, w1, b1, w2, b2


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _run(fn, tensors, grad_out):
    out = fn(*tensors)
    present = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype))
    return out, grads


def _bound(low, exact, dtype):
    return 2 * (low.double() - exact).abs().max().item() + torch.finfo(dtype).eps * exact.abs().max().item()


def _assert_matches_reference(inputs, dtype, *, device="cpu"):
    """Forward and every gradient of the extension vs the float64 reference."""
    dev_inputs = [None if t is None else t.to(device) for t in inputs]
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64).to(device)
    exact = _run(reference.channel_attention, _leaves(dev_inputs, torch.float64), grad_out)
    low = _run(reference.channel_attention, _leaves(dev_inputs), grad_out)
    ext = _run(lambda *a: ops.channel_attention(*a, backend="extension"), _leaves(dev_inputs), grad_out)
    names = ["out"] + ["grad_" + n for n, t in zip(("x", "w1", "b1", "w2", "b2"), inputs) if t is not None]
    outs_exact = [exact[0], *exact[1]]
    outs_low = [low[0], *low[1]]
    outs_ext = [ext[0], *ext[1]]
    for name, e, lo, got in zip(names, outs_exact, outs_low, outs_ext):
        assert got.dtype == lo.dtype, name
        assert got.shape == e.shape, name
        err = (got.double() - e).abs().max().item()
        assert err <= _bound(lo, e, dtype), f"{name}: error {err:.3g} vs bound {_bound(lo, e, dtype):.3g}"
    return ext


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_and_grads_match_float64_reference(shape, dtype, bias):
    _assert_matches_reference(_inputs(shape, dtype, bias=bias), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_match_reference_and_keep_strides(layout, dtype):
    inputs = _inputs((2, 3, 40, 4, 4, 5), dtype, layout=layout)
    out, grads = _assert_matches_reference(inputs, dtype)
    x = inputs[0]
    if layout != "strided":
        assert out.stride() == x.stride()
        assert grads[0].stride() == x.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_pool_is_exact_max_and_accurate_mean(layout, dtype):
    x = _inputs((2, 3, 37, 16, 8, 1), dtype, layout=layout)[0]
    gmp, gap = _ops().channel_pool(x)
    assert gmp.dtype == gap.dtype == torch.float32
    torch.testing.assert_close(gmp, x.float().amax(dim=(3, 4)), rtol=0, atol=0)
    exact = x.double().mean(dim=(3, 4))
    bound = 2 * (x.float().mean(dim=(3, 4)).double() - exact).abs().max().item()
    assert (gap.double() - exact).abs().max().item() <= bound + torch.finfo(torch.float32).eps * exact.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["contiguous", "frame_channels_last"])
def test_gradcheck_float64(bias, layout):
    x, w1, b1, w2, b2 = _inputs((2, 3, 6, 3, 2, 2), torch.float64, bias=bias, layout=layout)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves = [t for t in _leaves([x, w1, b1, w2, b2]) if t is not None]

    def fn(*args):
        it = iter(args)
        x_, w1_ = next(it), next(it)
        b1_ = next(it) if bias else None
        w2_ = next(it)
        b2_ = next(it) if bias else None
        return ops.channel_attention(x_, w1_, b1_, w2_, b2_, backend="extension")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ties_give_a_valid_subgradient():
    """Constant maps tie every position and every frame: the max routes its gradient to one
    winner, so per-channel totals and the weight gradients equal the reference's (which
    splits ties evenly), and nothing is NaN."""
    B, N, C, H, W, R = 2, 3, 10, 4, 4, 3
    _, w1, b1, w2, b2 = _inputs((B, N, C, H, W, R), torch.float64)
    x = torch.full((B, N, C, H, W), 0.5, dtype=torch.float64)
    # Constant over frames and positions, so that only the routed GMP gradient varies there.
    grad_out = torch.randn(B, 1, C, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad_out = grad_out.expand(x.shape)
    ref_out, ref_grads = _run(reference.channel_attention, _leaves([x, w1, b1, w2, b2]), grad_out)
    out, grads = _run(lambda *a: ops.channel_attention(*a, backend="extension"), _leaves([x, w1, b1, w2, b2]),
                      grad_out)
    for g in (out, *grads):
        assert torch.isfinite(g).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0].sum(dim=(1, 3, 4)), ref_grads[0].sum(dim=(1, 3, 4)), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The GMP gradient lands on the first position of the first frame only.
    spread = grads[0] - grads[0][:, -1:, :, -1:, -1:]
    assert spread[:, 1:].abs().max() < 1e-12
    assert spread[:, 0].flatten(2)[..., 1:].abs().max() < 1e-12
    assert spread[:, 0, :, 0, 0].abs().min() > 0


def _opcheck_samples():
    samples = []
    for layout in ("contiguous", "frame_channels_last", "channels_last_3d"):
        for bias in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                samples.append(_inputs((2, 3, 20, 5, 3, 4), dtype, bias=bias, layout=layout))
    return samples


@pytest.mark.parametrize("index", range(len(_opcheck_samples())))
def test_opcheck_channel_attention(index):
    x, w1, b1, w2, b2 = _leaves(_opcheck_samples()[index])
    torch.library.opcheck(_ops().channel_attention.default, (x, w1, b1, w2, b2))


@pytest.mark.parametrize("index", range(len(_opcheck_samples())))
def test_opcheck_channel_attention_backward(index):
    x, w1, b1, w2, b2 = _opcheck_samples()[index]
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(x.dtype)
    torch.library.opcheck(_ops().channel_attention_backward.default, (grad_out, x, w1, b1, w2, b2))


@pytest.mark.parametrize("index", range(len(_opcheck_samples())))
def test_opcheck_channel_pool(index):
    torch.library.opcheck(_ops().channel_pool.default, (_opcheck_samples()[index][0],))


def test_compiles_with_aot_autograd():
    x, w1, b1, w2, b2 = _leaves(_inputs((2, 3, 20, 4, 4, 4), torch.float32))
    fn = torch.compile(lambda *a: ops.channel_attention(*a, backend="extension"), backend="aot_eager", fullgraph=True)
    out = fn(x, w1, b1, w2, b2)
    out.square().sum().backward()
    ref = _leaves([x, w1, b1, w2, b2])
    ref_out = reference.channel_attention(*ref)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out)
    for got, want in zip((x, w1, b1, w2, b2), ref):
        torch.testing.assert_close(got.grad, want.grad)


def test_auto_backend_uses_the_extension():
    x, w1, b1, w2, b2 = _inputs((2, 3, 20, 4, 4, 4), torch.float32)
    out = ops.channel_attention(x, w1, b1, w2, b2)
    torch.testing.assert_close(out, _ops().channel_attention(x, w1, b1, w2, b2), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "5 dims"),
        (lambda a: {**a, "w1": a["w1"][:, :-1]}, ValueError, "w1 must have shape"),
        (lambda a: {**a, "w2": a["w2"][:-1]}, ValueError, "w2 must have shape"),
        (lambda a: {**a, "b1": a["b1"][:-1]}, ValueError, "b1 must have shape"),
        (lambda a: {**a, "b2": a["b2"][:, None]}, ValueError, "b2 must have shape"),
        (lambda a: {**a, "x": a["x"].to(torch.int32)}, TypeError, "float32"),
        (lambda a: {**a, "w1": a["w1"].to("meta")}, ValueError, "one device"),
        (lambda a: {**a, "x": a["x"][:, :0]}, ValueError, "empty"),
    ],
    ids=["rank", "w1_shape", "w2_shape", "b1_shape", "b2_rank", "dtype", "device", "empty"],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    x, w1, b1, w2, b2 = _inputs((2, 3, 20, 4, 4, 4), torch.float32)
    args = change({"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2})
    with pytest.raises(error, match=match):
        ops.channel_attention(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], backend="extension")


def test_operator_rejects_wrong_rank_directly():
    with pytest.raises(RuntimeError, match=r"\[B, N, C, H, W\]"):
        _ops().channel_attention(torch.ones(2, 3, 4, 5), torch.ones(1, 3), None, torch.ones(3, 1), None)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "frame_channels_last", "channels_last_3d"])
def test_cuda_matches_float64_reference(shape, dtype, layout):
    out, grads = _assert_matches_reference(_inputs(shape, dtype, layout=layout), dtype, device="cuda")
    assert out.is_cuda and all(g.is_cuda for g in grads)


@pytest.mark.gpu
def test_cuda_pool_and_real_shape():
    x, w1, b1, w2, b2 = _inputs((4, 8, 1024, 16, 8, 64), torch.bfloat16)
    x, w1, b1, w2, b2 = (t.cuda() for t in (x, w1, b1, w2, b2))
    gmp, gap = _ops().channel_pool(x)
    torch.testing.assert_close(gmp, x.float().amax(dim=(3, 4)), rtol=0, atol=0)
    torch.testing.assert_close(gap, x.float().mean(dim=(3, 4)), rtol=1e-5, atol=1e-5)
    _assert_matches_reference([t.cpu() for t in (x, w1, b1, w2, b2)], torch.bfloat16, device="cuda")
