"""The SE bottleneck tail op (``fastnl.ops.se_residual_relu``) against the float64 reference.

Low-precision results are held to twice the plain PyTorch error in that dtype (both measured
against the float64 reference on the same rounded inputs), with one ulp of the result's
magnitude as a floor.
"""
import pytest
import torch

from fastnl import _extension, ops, reference

pytestmark = pytest.mark.skipif(not _extension.available(), reason="fastnl._C extension is not built")

# (N, C, H, W): odd sizes, H*W = 1, C not a multiple of any vector width, SE-ResNet50 maps
SHAPES = [(1, 3, 5, 7), (2, 33, 1, 1), (3, 24, 4, 4), (2, 256, 16, 8), (4, 20, 8, 4)]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _layout(t, layout):
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return torch.cat([t, t], dim=3)[..., : t.shape[3]]  # not dense: copied by the op


def _inputs(shape, dtype, *, seed=0, layout="contiguous", scale=1.0):
    N, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    x = _layout(scale * torch.randn(N, C, H, W, generator=gen, dtype=torch.float64), layout).to(dtype)
    shortcut = _layout(scale * torch.randn(N, C, H, W, generator=gen, dtype=torch.float64), layout).to(dtype)
    gate = torch.sigmoid(2 * torch.randn(N, C, generator=gen, dtype=torch.float64)).to(dtype)
    return x, gate, shortcut


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _run(fn, tensors, grad_out):
    out = fn(*tensors)
    return [out, *torch.autograd.grad(out, tensors, grad_out.to(out.dtype))]


def _bound(low, exact, dtype):
    return max(2 * (low.double() - exact).abs().max().item(), torch.finfo(dtype).eps * exact.abs().max().item())


def _assert_matches_reference(inputs, dtype, device="cpu"):
    inputs = [t.to(device) for t in inputs]
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(device)
    exact = _run(reference.se_residual_relu, _leaves(inputs, torch.float64), grad_out)
    low = _run(reference.se_residual_relu, _leaves(inputs), grad_out)
    ext = _run(lambda *a: ops.se_residual_relu(*a, backend="extension"), _leaves(inputs), grad_out)
    for name, e, lo, got in zip(("out", "grad_x", "grad_gate", "grad_shortcut"), exact, low, ext):
        assert got.dtype == lo.dtype and got.shape == e.shape and got.device == e.device, name
        err = (got.double() - e).abs().max().item()
        assert err <= _bound(lo, e, dtype), f"{name}: error {err:.3g} vs bound {_bound(lo, e, dtype):.3g}"
    return ext


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_forward_and_grads_match_float64_reference(shape, dtype):
    _assert_matches_reference(_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_match_reference_and_keep_channels_last(layout, dtype):
    inputs = _inputs((2, 24, 6, 5), dtype, layout=layout)
    out, grad_x, _grad_gate, grad_shortcut = _assert_matches_reference(inputs, dtype)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grad_x.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_extreme_magnitudes(scale):
    _assert_matches_reference(_inputs((2, 16, 8, 4), torch.bfloat16, scale=scale), torch.bfloat16)


def test_float64_is_exact_to_the_last_bits_and_passes_gradcheck():
    x, gate, shortcut = _leaves(_inputs((2, 5, 3, 4), torch.float64))
    out = ops.se_residual_relu(x, gate, shortcut, backend="extension")
    torch.testing.assert_close(out, reference.se_residual_relu(x, gate, shortcut), rtol=0, atol=0)
    # keep every pre-activation away from the ReLU's kink, where finite differences break
    with torch.no_grad():
        pre = x * gate[..., None, None] + shortcut
        shortcut += torch.where(pre.abs() < 0.05, 0.1 * torch.sign(pre + 1e-12), torch.zeros_like(pre))
    fn = lambda a, b, c: ops.se_residual_relu(a, b, c, backend="extension")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gate, shortcut), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_relu_kink_and_zeros_route_no_gradient():
    """Where x * gate + shortcut is exactly 0 the output is 0 and, as torch's ReLU backward
    gives, no gradient flows (to x, gate or shortcut)."""
    x = torch.tensor([[[[1.0, 2.0, -1.0, 0.0]]]]).requires_grad_()
    gate = torch.tensor([[0.5]]).requires_grad_()
    shortcut = torch.tensor([[[[-0.5, 1.0, 0.5, 0.0]]]]).requires_grad_()
    out = ops.se_residual_relu(x, gate, shortcut, backend="extension")
    assert out.tolist() == [[[[0.0, 2.0, 0.0, 0.0]]]]
    out.backward(torch.tensor([[[[10.0, 1.0, 100.0, 1000.0]]]]))
    assert x.grad.tolist() == [[[[0.0, 0.5, 0.0, 0.0]]]]
    assert shortcut.grad.tolist() == [[[[0.0, 1.0, 0.0, 0.0]]]]
    assert gate.grad.tolist() == [[2.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nan_and_inf_propagate_as_in_torch(dtype):
    """A NaN pre-activation stays NaN (torch.relu keeps it) and its gradient passes, as
    torch's ReLU backward passes it; -inf gives 0 and no gradient. Nothing is silently zeroed."""
    x = torch.tensor([[[[float("nan"), 1.0, float("-inf"), 2.0]]]], dtype=dtype).requires_grad_()
    gate = torch.tensor([[0.5]], dtype=dtype).requires_grad_()
    shortcut = torch.tensor([[[[0.0, float("nan"), 0.0, -3.0]]]], dtype=dtype).requires_grad_()
    g = torch.tensor([[[[1.0, 2.0, 4.0, 8.0]]]], dtype=dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate, shortcut)]
    out = ops.se_residual_relu(x, gate, shortcut, backend="extension")
    want = reference.se_residual_relu(*leaves)
    torch.testing.assert_close(out, want, equal_nan=True, rtol=0, atol=0)
    out.backward(g)
    want.backward(g)
    for got, ref in zip((x, shortcut), leaves[::2]):
        torch.testing.assert_close(got.grad, ref.grad, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(gate.grad).all() and torch.isnan(leaves[1].grad).all()


def test_gate_in_any_float_dtype_and_shape_gives_plain_pytorchs_dtype():
    x, gate, shortcut = _inputs((2, 8, 3, 3), torch.bfloat16)
    for g in (gate, gate.float(), gate[..., None, None]):
        out = ops.se_residual_relu(x, g, shortcut)
        want = reference.se_residual_relu(x, g.reshape(2, 8), shortcut)
        assert out.dtype == want.dtype
        torch.testing.assert_close(out.double(), want.double(), rtol=0.02, atol=0.02)


def _opcheck_samples():
    return [_inputs((2, 12, 3, 5), torch.float32), _inputs((2, 16, 4, 4), torch.bfloat16, layout="channels_last"),
            _inputs((1, 3, 1, 1), torch.float64)]


@pytest.mark.parametrize("index", range(3))
def test_opcheck(index):
    x, gate, shortcut = _opcheck_samples()[index]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, gate, shortcut = _leaves([x, gate.to(acc), shortcut])
    ext = _extension.load()
    torch.library.opcheck(ext.se_residual_relu.default, (x, gate, shortcut))
    out = ext.se_residual_relu(x, gate, shortcut).detach()
    torch.library.opcheck(ext.se_residual_relu_backward.default, (torch.randn_like(out), out, x.detach(),
                                                                  gate.detach()))


def test_compiles_with_aot_autograd():
    x, gate, shortcut = _leaves(_inputs((2, 12, 4, 4), torch.float32))
    fn = torch.compile(lambda *a: ops.se_residual_relu(*a, backend="extension"), backend="aot_eager", fullgraph=True)
    fn(x, gate, shortcut).square().sum().backward()
    ref = _leaves([x, gate, shortcut])
    reference.se_residual_relu(*ref).square().sum().backward()
    for got, want in zip((x, gate, shortcut), ref):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "4 dims"),
        (lambda a: {**a, "shortcut": a["shortcut"][:, :-1]}, ValueError, "shortcut must have x's shape"),
        (lambda a: {**a, "gate": a["gate"][:, :-1]}, ValueError, r"gate must have shape \[N, C\] = \[2, 8\]"),
        (lambda a: {**a, "gate": a["gate"].to(torch.int32)}, TypeError, "gate must be floating point"),
        (lambda a: {**a, "x": a["x"].to(torch.int32)}, TypeError, "float32"),
        (lambda a: {**a, "shortcut": a["shortcut"].to("meta")}, ValueError, "one device"),
        (lambda a: {**a, "x": a["x"][:0], "shortcut": a["shortcut"][:0]}, ValueError, "empty"),
    ],
    ids=["rank", "shortcut_shape", "gate_shape", "gate_dtype", "dtype", "device", "empty"],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    x, gate, shortcut = _inputs((2, 8, 3, 3), torch.float32)
    a = change({"x": x, "gate": gate, "shortcut": shortcut})
    with pytest.raises(error, match=match):
        ops.se_residual_relu(a["x"], a["gate"], a["shortcut"], backend="extension")


def test_without_kernels_auto_warns_and_extension_names_the_cause(monkeypatch):
    args = _inputs((2, 8, 3, 3), torch.float32)
    monkeypatch.setattr(_extension, "has_se_kernels_for", lambda device: False)
    monkeypatch.setattr(_extension, "_warned", set())
    with pytest.raises(RuntimeError, match="se_residual_relu on cpu"):
        ops.se_residual_relu(*args, backend="extension")
    with pytest.warns(RuntimeWarning, match="SE block tail"):
        out = ops.se_residual_relu(*args)
    torch.testing.assert_close(out, reference.se_residual_relu(*args), rtol=0, atol=0)


def test_fused_model_blocks_use_the_op_and_keep_the_state_dict():
    from timm.models.resnet import Bottleneck

    from fastnl.model import build_model
    from fastnl.model.se_bottleneck import FusedSEBottleneck

    torch.manual_seed(0)
    fused = build_model(10, impl="fused", verbose=False)
    torch.manual_seed(0)
    plain = build_model(10, impl="reference", verbose=False)
    blocks = [m for m in fused.backbone.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and all(type(m) is FusedSEBottleneck for m in blocks)
    assert not any(type(m) is FusedSEBottleneck for m in plain.backbone.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    # one block, float64: the fused forward and backward are the plain block's
    fused_block, plain_block = blocks[3].double(), [m for m in plain.backbone.modules()
                                                    if isinstance(m, Bottleneck)][3].double()
    plain_block.load_state_dict(fused_block.state_dict())
    x = torch.randn(2, fused_block.conv1.in_channels, 8, 4, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = fused_block(xa), plain_block(xb)
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    for (name, pa), pb in zip(fused_block.named_parameters(), plain_block.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_float64_reference(shape, dtype, layout):
    out, *grads = _assert_matches_reference(_inputs(shape, dtype, layout=layout), dtype, device="cuda")
    assert out.is_cuda and all(g.is_cuda for g in grads)
