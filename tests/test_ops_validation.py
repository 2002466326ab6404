"""fastnl.ops validates its inputs once, with errors that name the argument and the shape."""
import pytest
import torch

from fastnl import ops


def _qkv(b=2, length=5, d=16, dtype=torch.float32):
    return [torch.randn(b, length, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_attention_backends_agree_with_reference_formula(backend):
    q, k, v = _qkv(dtype=torch.float64)
    expected = torch.softmax(0.3 * q @ k.transpose(1, 2), -1) @ v
    torch.testing.assert_close(ops.nl_attention(q, k, v, scale=0.3, backend=backend), expected)


def test_attention_auto_on_cpu_is_the_chunked_path():
    q, k, v = _qkv(dtype=torch.float64)
    out = ops.nl_attention(q, k, v)
    assert out.grad_fn is None  # no grad requested
    q.requires_grad_(True)
    out = ops.nl_attention(q, k, v)
    assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_fastnl_nl_attention_chunked_defaultBackward"


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        ((torch.randn(5, 16),) * 3, ValueError, r"q must have shape \[B, L, D\]"),
        ((torch.randn(2, 5, 16), torch.randn(2, 6, 16), torch.randn(2, 6, 16)), ValueError, "k .*6, 16"),
        ((torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 8)), ValueError, r"v \(2, 5, 8\)"),
        ((torch.randn(2, 0, 16),) * 3, ValueError, "q is empty"),
        ((torch.randn(2, 5, 16), torch.randn(2, 5, 16).half(), torch.randn(2, 5, 16)), TypeError, "k has dtype"),
        ((torch.randint(0, 3, (2, 5, 16)),) * 3, TypeError, "q must be float"),
        (([[1.0]], [[1.0]], [[1.0]]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_attention_bad_inputs(args, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.nl_attention(*args)


def test_attention_bad_backend_and_scale():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.nl_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.nl_attention(q, k, v, scale=float("inf"))


def test_attention_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.nl_attention(q, k, v, backend="triton")


def _channel_args(b=2, n=3, c=8, r=2):
    return (torch.randn(b, n, c, 2, 2), torch.randn(r, c), torch.randn(r), torch.randn(c, r), torch.randn(c))


def test_channel_reference_backend_and_none_biases():
    x, w1, b1, w2, b2 = _channel_args()
    out = ops.channel_attention(x, w1, None, w2, None, backend="reference")
    gate = torch.sigmoid(
        (torch.tanh(x.amax((3, 4)) @ w1.T) @ w2.T).amax(1) + (torch.tanh(x.mean((3, 4)) @ w1.T) @ w2.T).mean(1)
    )
    torch.testing.assert_close(out, x * gate[:, None, :, None, None])


def test_channel_extension_without_kernels_for_the_device(monkeypatch):
    """A build of the extension without kernels for x's device: "extension" names the cause,
    "auto" warns and gives the reference's result."""
    from fastnl import _extension

    if not _extension.available():
        pytest.skip("the extension is not built here")
    assert _extension.has_kernels_for(torch.device("cpu"))
    assert not _extension.has_kernels_for(torch.device("meta"))
    monkeypatch.setattr(_extension, "has_kernels_for", lambda device: False)
    monkeypatch.setattr(_extension, "_warned", set())
    args = _channel_args()
    with pytest.raises(RuntimeError, match="built without CPU kernels"):
        ops.channel_attention(*args, backend="extension")
    with pytest.warns(RuntimeWarning, match="built without CPU kernels"):
        out = ops.channel_attention(*args)
    torch.testing.assert_close(out, ops.channel_attention(*args, backend="reference"), rtol=0, atol=0)


@pytest.mark.parametrize(
    "index, value, error, pattern",
    [
        (0, torch.randn(2, 8, 2, 2), ValueError, r"x must have shape \[B, N, C, H, W\]"),
        (1, torch.randn(2, 7), ValueError, r"w1 must have shape \[R, C\] = \[R, 8\]"),
        (3, torch.randn(8, 3), ValueError, r"w2 must have shape \[C, R\] = \[8, 2\]"),
        (2, torch.randn(3), ValueError, r"b1 must have shape \[2\]"),
        (4, torch.randn(7), ValueError, r"b2 must have shape \[8\]"),
        (0, torch.randn(2, 3, 8, 0, 2), ValueError, "x is empty"),
        (1, torch.randn(2, 8).to(torch.int32), TypeError, "w1 must be float"),
        (2, torch.randn(2, device="meta"), ValueError, "b1 is on meta"),
    ],
)
def test_channel_bad_inputs(index, value, error, pattern):
    args = list(_channel_args())
    args[index] = value
    with pytest.raises(error, match=pattern):
        ops.channel_attention(*args)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.channel_attention(*_channel_args(), backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_attention_keeps_float32_accumulation_inside_autocast(backend):
    """An enclosing bf16 autocast must not downcast the matmuls inside the op."""
    q, k, v = _qkv(b=1, length=64, d=32)
    expected = torch.softmax(q.double() @ k.double().transpose(1, 2), -1) @ v.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.nl_attention(q, k, v, backend=backend)
    assert out.dtype == torch.float32
    assert (out.double() - expected).abs().max() < 1e-4  # bf16 matmuls would be ~1e-2 off


def test_nlam_trains_under_bf16_autocast_with_both_impls():
    from fastnl.model import NLAM

    grads = []
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        module = NLAM(64, reduction=8, impl=impl)
        torch.nn.init.ones_(module.w0_bn.weight)
        x = torch.randn(6, 64, 4, 2, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, 3)
        out.float().square().sum().backward()
        assert torch.isfinite(x.grad).all()
        grads.append(x.grad)
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.5.5", True), ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.5.0", False), ("3.8.0+git1234", "2.6.0rc1", False), ("3.5.1", "2.4.0.dev0", True),
])
def test_triton_interpreter_problem_names_the_versions(monkeypatch, triton_version, numpy_version, broken):
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = ops.triton_interpreter_problem()
    assert (problem is not None) == broken
    if broken:
        assert triton_version in problem and numpy_version in problem and "numpy<2.4" in problem
        q, k, v = _qkv()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(RuntimeError, match="cannot run with numpy"):
            ops.nl_attention(q, k, v, backend="triton")


# On CUDA the engine table decides (the flash kernel at small D, the chunked engine at the
# model's D); a D the flash kernel refuses goes to the chunked engine, which takes any D.
@pytest.mark.parametrize("device_type, dtype, head_dim, expected", [
    ("cuda", torch.bfloat16, 512, "chunked"), ("cuda", torch.float32, 1024, "chunked"),
    ("cuda", torch.float16, 16, "triton"), ("cuda", torch.float64, 512, "torch"),
    ("cuda", torch.bfloat16, 20, "chunked"), ("cuda", torch.bfloat16, 1040, "chunked"),
    ("cpu", torch.bfloat16, 512, "torch"), ("cpu", torch.float64, 512, "torch"),
])
def test_auto_attention_backend_never_picks_what_triton_refuses(monkeypatch, device_type, dtype, head_dim,
                                                                expected):
    from fastnl._paths import import_kernels

    assert ops.TRITON_MAX_HEAD_DIM == import_kernels().nl_attention.MAX_HEAD_DIM
    monkeypatch.setattr(ops, "_triton_available", lambda: True)
    assert ops.auto_attention_backend(device_type, dtype, head_dim) == expected
    monkeypatch.setattr(ops, "_triton_available", lambda: False)
    assert ops.auto_attention_backend(device_type, dtype, head_dim) == "torch"
