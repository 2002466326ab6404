"""The BatchNorm + ReLU op (``fastnl.ops.batch_norm_relu``, Triton kernels; interpreted on a CPU)
against the float64 reference.

Every result (y, the gradients of x, weight and bias, the running statistics) is held to twice
the plain PyTorch error in that dtype (measured against float64 on the same rounded inputs),
with one ulp of the result's magnitude as a floor. In half precision plain is ``F.batch_norm``
then ``relu`` (float32 inside, one rounding at the end, as the kernels). In float32 on a GPU
plain is ``F.batch_norm`` too; on a CPU, whose ``F.batch_norm`` accumulates in double (an
accuracy no float32 GPU kernel has, cuDNN's included), it is BatchNorm as the CUDA kernels
compute it: Welford's update in float32 for the statistics, then ``(x - mean) * rsqrt(var +
eps) * weight + bias`` and ``relu`` in float32 ops.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastnl import ops, reference

pytestmark = pytest.mark.triton
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled on a GPU

# (N, C, H, W): batch 1, odd sizes, C past one channel block (128), H*W past one position block
# (512), a 1x1 map, and an SE-ResNet50 layer4 map
SHAPES = [(3, 5, 7, 9), (1, 6, 3, 5), (4, 130, 3, 5), (2, 17, 40, 30), (9, 4, 1, 1), (2, 64, 8, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
NAMES = ("y", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var")


def _layout(t, layout):
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return torch.cat([t, t], dim=3)[..., : t.shape[3]]  # not dense: the op copies it


def _inputs(shape, *, seed=0, offset=0.5, spread=2.0, device=DEVICE):
    N, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    x = offset + spread * torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, generator=gen, dtype=torch.float64)
    bias = 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)
    running = (torch.randn(C, generator=gen, dtype=torch.float64), 0.5 + torch.rand(C, generator=gen,
                                                                                   dtype=torch.float64))
    grad_y = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    x, weight, bias, grad_y = (t.to(device) for t in (x, weight, bias, grad_y))
    return x, weight, bias, tuple(t.to(device) for t in running), grad_y


def _welford_float32(x):
    """Per-channel mean and biased variance of float32 x [N, C, H, W] by Welford's update in
    float32, one element at a time (differentiable, as autograd sees the float32 ops)."""
    values = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    m2 = torch.zeros_like(mean)
    for i in range(values.shape[1]):
        delta = values[:, i] - mean
        mean = mean + delta / (i + 1)
        m2 = m2 + delta * (values[:, i] - mean)
    return mean, m2 / values.shape[1]


def _run(x, weight, bias, running, grad_y, *, dtype, layout, backend, momentum=0.1):
    """[y, grad_x, grad_weight, grad_bias, running_mean, running_var] of one call, x in dtype
    (weight, bias and the running statistics float32 as under autocast; float64 for float64)."""
    param = torch.float64 if dtype == torch.float64 else torch.float32
    xd = _layout(x, layout).to(dtype).requires_grad_()
    w, b = (t.to(param).requires_grad_() for t in (weight, bias))
    rm, rv = (t.to(param).clone() for t in running)
    if backend == "exact" or (backend == "reference" and (dtype != torch.float32 or xd.is_cuda)):
        y = reference.batch_norm_relu(xd, rm, rv, w, b, True, momentum, 1e-5)
    elif backend == "reference":  # float32 on a CPU: BatchNorm as CUDA computes it
        mean, var = _welford_float32(xd)
        mean, var = mean.view(1, -1, 1, 1), var.view(1, -1, 1, 1)
        y = torch.relu((xd - mean) * torch.rsqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
        count = xd.numel() // xd.shape[1]
        with torch.no_grad():
            rm.lerp_(mean.flatten(), momentum)
            rv.lerp_(var.flatten() * (count / (count - 1)), momentum)
    else:
        y = ops.batch_norm_relu(xd, rm, rv, w, b, training=True, momentum=momentum, backend=backend)
    grads = torch.autograd.grad(y, (xd, w, b), _layout(grad_y, layout).to(y.dtype))
    return [y, *grads, rm, rv], xd


def _worst(tensor_errors, exact, dtype):
    return max(tensor_errors), torch.finfo(dtype).eps * max(e.abs().max().item() for e in exact)


def _assert_within_twice_plain(inputs, dtype, layout="contiguous", momentum=0.1, seeds=None):
    """Each result's error against float64 at most twice plain's, with one ulp of its magnitude
    as a floor. In float32 the worst error over ``seeds`` (default 5) against plain's worst over
    the same seeds: both are then summation noise of a few roundings, and one seed's pair is a
    coin toss (plain's error in a 9-term sum may be a quarter ulp or one). Half precision is
    dominated by the one final rounding: one seed. ``inputs``: a function of the seed."""
    seeds = (range(5) if dtype == torch.float32 else (0,)) if seeds is None else seeds
    errors = {name: ([], [], []) for name in NAMES}
    for seed in seeds:
        x, weight, bias, running, grad_y = inputs(seed)
        x = x.to(dtype).double()  # every run starts from the same rounded x
        exact, _ = _run(x, weight, bias, running, grad_y, dtype=torch.float64, layout=layout, backend="exact",
                        momentum=momentum)
        plain, _ = _run(x, weight, bias, running, grad_y, dtype=dtype, layout=layout, backend="reference",
                        momentum=momentum)
        got, xd = _run(x, weight, bias, running, grad_y, dtype=dtype, layout=layout, backend="triton",
                       momentum=momentum)
        for name, e, lo, g in zip(NAMES, exact, plain, got):
            assert g.dtype == lo.dtype and g.shape == e.shape, name
            ours, theirs, magnitude = errors[name]
            ours.append((g.double() - e).abs().max().item())
            theirs.append((lo.double() - e).abs().max().item())
            magnitude.append(e)
    for name, (ours, theirs, magnitude) in errors.items():
        result_dtype = torch.float32 if name.startswith("running") or name.endswith(("weight", "bias")) else dtype
        plain_err, ulp = _worst(theirs, magnitude, result_dtype)
        bound = max(2 * plain_err, ulp)
        assert max(ours) <= bound, f"{name}: error {max(ours):.3g} vs bound {bound:.3g} (plain {plain_err:.3g})"
    return got, xd


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_gradients_and_running_stats_within_twice_the_plain_error(shape, dtype):
    _assert_within_twice_plain(lambda seed: _inputs(shape, seed=seed), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_within_twice_the_plain_error_and_keep_the_layout(layout, dtype):
    (y, grad_x, *_), xd = _assert_within_twice_plain(lambda seed: _inputs((3, 20, 6, 5), seed=2 + seed), dtype,
                                                     layout)
    if layout != "strided":
        assert y.stride() == xd.stride() and grad_x.stride() == xd.stride()


@pytest.mark.parametrize("offset", [300.0, -1e4])
def test_large_mean_against_the_spread_loses_nothing_to_cancellation(offset):
    # float32 sums of squares minus the squared mean would lose every digit of the variance here
    _assert_within_twice_plain(lambda seed: _inputs((4, 6, 9, 7), seed=3 + seed, offset=offset, spread=1.0),
                               torch.float32)


def test_gradient_passes_exactly_where_the_output_is_positive():
    x, weight, bias, running, grad_y = _inputs((2, 8, 5, 6), seed=4)
    xd = x.float().requires_grad_()
    w, b = weight.float().requires_grad_(), bias.float().requires_grad_()
    y = ops.batch_norm_relu(xd, None, None, w, b, training=True, backend="triton")
    y.backward(grad_y.float())
    passed = (y > 0).double()
    assert 0.2 < passed.mean().item() < 0.8  # both sides of the kink are exercised
    want = (grad_y.float().double() * passed).sum((0, 2, 3))  # dbias = sum of the passed gradient
    torch.testing.assert_close(b.grad.double(), want, rtol=0, atol=1e-5)


def test_momentum_zero_leaves_the_running_stats_untouched_and_none_are_allowed():
    x, weight, bias, (rm, rv), _ = _inputs((2, 5, 4, 4))
    rm, rv = rm.float(), rv.float()
    before = rm.clone(), rv.clone()
    ops.batch_norm_relu(x.float(), rm, rv, weight.float(), bias.float(), training=True, momentum=0.0,
                        backend="triton")
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    y = ops.batch_norm_relu(x.float(), None, None, weight.float(), bias.float(), training=True, backend="triton")
    want = reference.batch_norm_relu(x, None, None, weight, bias, True, 0.1, 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-6)


def test_nan_propagates_as_in_torch():
    x, weight, bias, _, _ = _inputs((2, 3, 4, 4))
    x[0, 1, 2, 2] = float("nan")
    y = ops.batch_norm_relu(x.float(), None, None, weight.float(), bias.float(), training=True, backend="triton")
    want = reference.batch_norm_relu(x.float(), None, None, weight.float(), bias.float(), True, 0.1, 1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.isnan(y[:, 1]).all()
    torch.testing.assert_close(y[:, [0, 2]], want[:, [0, 2]])


def _bn(channels, momentum=0.1):
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return bn.to(DEVICE)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bottleneck_helper_follows_the_module_rules(monkeypatch, momentum):
    from fastnl.model.se_bottleneck import bn_relu

    monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    fused, plain = _bn(7, momentum), _bn(7, momentum)
    x = torch.randn(3, 7, 5, 4, device=DEVICE)
    for step in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn_relu(fused, nn.ReLU(inplace=True), xa), nn.ReLU(inplace=True)(plain(xb))
        torch.testing.assert_close(ya, yb, rtol=0, atol=5e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=5e-5)
        assert fused.num_batches_tracked.item() == plain.num_batches_tracked.item() == step + 1
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=0, atol=1e-6)
        x = x * 1.5 + 0.3
    for pa, pb in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=5e-5)
    # eval mode, another activation or SyncBatchNorm: the modules as they are, the op not called
    monkeypatch.setattr(ops, "batch_norm_relu", lambda *a, **k: pytest.fail("the op ran"))
    fused.eval()
    torch.testing.assert_close(bn_relu(fused, nn.ReLU(), x), torch.relu(fused(x)), rtol=0, atol=0)
    fused.train()
    bn_relu(fused, nn.GELU(), x)


def test_fused_block_with_the_op_matches_the_plain_block(monkeypatch):
    from timm.models.resnet import Bottleneck

    from fastnl.model import build_model
    from fastnl.model.se_bottleneck import FusedSEBottleneck

    torch.manual_seed(0)
    fused = build_model(10, impl="fused", verbose=False)
    torch.manual_seed(0)
    plain = build_model(10, impl="reference", verbose=False)
    block = [m for m in fused.backbone.modules() if isinstance(m, FusedSEBottleneck)][4].to(DEVICE)
    plain_block = [m for m in plain.backbone.modules() if isinstance(m, Bottleneck)][4].to(DEVICE)
    calls = []
    original = ops.batch_norm_relu
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the convolutions alike in both blocks
    monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    monkeypatch.setattr(ops, "batch_norm_relu", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, block.conv1.in_channels, 6, 4, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = block(xa), plain_block(xb)
    assert len(calls) == 2  # bn1 + act1 and bn2 + act2
    assert_blocks_match(block, plain_block, (xa, out_a), (xb, out_b), rtol=1e-3, atol=1e-4)


def assert_blocks_match(block, plain_block, fused_run, plain_run, *, rtol, atol):
    """Outputs, input and parameter gradients (one random output gradient) and buffers of a
    fused block and the plain one on the same input; each run is (input leaf, output)."""
    (xa, out_a), (xb, out_b) = fused_run, plain_run
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=atol)
    for (name, pa), pb in zip(block.named_parameters(), plain_block.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=rtol, atol=atol, msg=name)
    for (name, ba), bb in zip(block.named_buffers(), plain_block.buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_model_stem_runs_the_op_and_matches_the_plain_stem(monkeypatch):
    from fastnl.model import build_model
    from fastnl.model.se_bottleneck import FusedStem

    torch.manual_seed(0)
    fused = build_model(10, impl="fused", verbose=False).to(DEVICE)
    torch.manual_seed(0)
    plain = build_model(10, impl="reference", verbose=False).to(DEVICE)
    stem, plain_stem = fused.stages()[0], plain.stages()[0]
    assert type(stem) is FusedStem and type(plain_stem) is nn.Sequential
    assert fused.state_dict().keys() == plain.state_dict().keys()
    calls = []
    original = ops.batch_norm_relu
    monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    monkeypatch.setattr(ops, "batch_norm_relu", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 3, 32, 16, device=DEVICE)
    torch.testing.assert_close(stem(x), plain_stem(x), rtol=1e-4, atol=1e-4)
    assert len(calls) == 1
    torch.testing.assert_close(fused.backbone.bn1.running_var, plain.backbone.bn1.running_var)


def test_compiles_with_aot_autograd():
    ops._triton_available()  # the kernels imported before tracing (tracing cannot import a module)
    x, weight, bias, _, grad_y = _inputs((2, 6, 4, 3))
    args = [t.float().requires_grad_() for t in (x, weight, bias)]
    fn = torch.compile(lambda a, w, b: ops.batch_norm_relu(a, None, None, w, b, training=True, backend="triton"),
                       backend="aot_eager", fullgraph=True)
    fn(*args).backward(grad_y.float())
    ref = [t.float().requires_grad_() for t in (x, weight, bias)]
    reference.batch_norm_relu(ref[0], None, None, ref[1], ref[2], True, 0.1, 1e-5).backward(grad_y.float())
    for got, want in zip(args, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_plain_and_auto_on_cpu_are_f_batch_norm_then_relu():
    x, weight, bias, (rm, rv), _ = _inputs((2, 5, 4, 4), device="cpu")
    args = [t.float() for t in (x, rm, rv, weight, bias)]
    want = torch.relu(F.batch_norm(args[0], args[1].clone(), args[2].clone(), args[3], args[4], True, 0.1, 1e-5))
    assert ops.batch_norm_relu_backend(args[0], True, args[3], args[4]) == "reference"
    for backend in ("auto", "reference"):
        got = ops.batch_norm_relu(args[0], args[1].clone(), args[2].clone(), args[3], args[4], training=True,
                                  backend=backend)
        assert torch.equal(got, want)


def test_the_environment_can_turn_the_kernels_off(monkeypatch):
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    w, b = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    expected = "triton" if x.is_cuda else "reference"
    assert ops.batch_norm_relu_backend(x, True, w, b) == expected
    monkeypatch.setenv("FASTNL_BN_RELU", "reference")
    assert ops.batch_norm_relu_backend(x, True, w, b) == "reference"
    monkeypatch.setenv("FASTNL_BN_RELU", "off")
    with pytest.raises(ValueError, match="FASTNL_BN_RELU must be 'auto' or 'reference', got 'off'"):
        ops.batch_norm_relu_backend(x, True, w, b)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "4 dims"),
        (lambda a: {**a, "weight": a["weight"][:-1]}, ValueError, r"weight must have shape \[C\] = \[5\]"),
        (lambda a: {**a, "running_var": a["running_var"].to("meta")}, ValueError, "one device"),
        (lambda a: {**a, "x": a["x"].double()}, TypeError, "float32, float16 or bfloat16 for backend='triton'"),
        (lambda a: {**a, "training": False}, ValueError, "batch statistics"),
        (lambda a: {**a, "bias": None}, ValueError, "affine"),
        (lambda a: {**a, "x": a["x"][:1, :, :1, :1]}, ValueError, "more than 1 value per channel"),
        (lambda a: {**a, "backend": "cuda"}, ValueError, "backend must be one of"),
        (lambda a: {**a, "running_var": None}, ValueError, "running_mean and running_var must be given together"),
    ],
    ids=["rank", "weight_shape", "device", "dtype", "eval", "no_bias", "one_value", "backend", "one_running"],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    x, weight, bias, (rm, rv), _ = _inputs((2, 5, 3, 3))
    a = change({"x": x.float(), "running_mean": rm.float(), "running_var": rv.float(), "weight": weight.float(),
                "bias": bias.float(), "training": True, "backend": "triton"})
    with pytest.raises(error, match=match):
        ops.batch_norm_relu(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                            training=a["training"], backend=a["backend"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_at_a_layer1_map_within_twice_the_plain_error(dtype, layout):
    # 16 images of SE-ResNet50's layer1 (256 channels, 64 x 32): many reduction programs per
    # channel block, each merging many tiles, against cuDNN's BatchNorm
    (y, *_), _ = _assert_within_twice_plain(lambda seed: _inputs((16, 256, 64, 32), seed=seed), dtype, layout,
                                            seeds=(0, 1))
    assert y.is_cuda
