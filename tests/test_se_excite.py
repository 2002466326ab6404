"""The SE module's excitation on the Triton kernels (``fastnl._se_excite``; interpreted on a CPU)
against float64: the gate and the gradients of the squeeze and of both convolutions' weights
and biases within twice plain PyTorch's error in the same dtype (the module's own layers, the
weights in that dtype as autocast casts them), one ulp of the magnitude as a floor; N not a
multiple of the kernels' 16 images, C not a multiple of their channel steps, R below their 16.
Half precision only: in float32 the fused bottleneck end keeps the module's layers."""
import copy

import pytest
import torch
from timm.layers import SEModule

from fastnl import _se_excite
from fastnl.model import se_bottleneck

pytestmark = pytest.mark.triton
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (N, C, R): batch 1, odd sizes, R = C / 16 as in SE-ResNet50 (256 / 16), R past one power of 2
SHAPES = [(1, 20, 5), (3, 130, 8), (17, 64, 4), (40, 256, 16), (5, 96, 24)]
DTYPES = [torch.float16, torch.bfloat16]
NAMES = ("gate", "grad_squeeze", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias")


def _module(C, R, seed, logit_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    se = SEModule(C, rd_channels=R).double()
    with torch.no_grad():
        for p in se.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / max(1, p[0].numel()) ** 0.5)
        se.fc2.weight.mul_(logit_scale)
        se.fc1.bias.add_(0.2)  # most reduced units on, some off
    return se


def _run(se64, squeeze, grad, dtype, fused):
    """[gate, grads...] of one call in ``dtype`` (float64 for the exact run)."""
    se = copy.deepcopy(se64).to(DEVICE, dtype)
    s = squeeze.to(DEVICE, dtype).requires_grad_()
    gate = _se_excite.excite(se, s) if fused else se.gate(se.fc2(se.act(se.fc1(s))))
    leaves = (s, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)
    return [gate, *torch.autograd.grad(gate, leaves, grad.to(DEVICE, dtype))]


def _assert_within_twice_plain(shape, dtype, seeds, logit_scale=1.0):
    N, C, R = shape
    errors = {name: ([], [], []) for name in NAMES}
    for seed in seeds:
        se64 = _module(C, R, seed, logit_scale)
        with torch.no_grad():  # the inputs as the run in dtype sees them
            for p in se64.parameters():
                p.copy_(p.to(dtype))
        gen = torch.Generator().manual_seed(100 + seed)
        squeeze = torch.randn(N, C, 1, 1, generator=gen, dtype=torch.float64).to(dtype).double()
        grad = torch.randn(N, C, 1, 1, generator=gen, dtype=torch.float64).to(dtype).double()
        exact = _run(se64, squeeze, grad, torch.float64, fused=False)
        plain = _run(se64, squeeze, grad, dtype, fused=False)
        got = _run(se64, squeeze, grad, dtype, fused=True)
        for name, e, lo, g in zip(NAMES, exact, plain, got, strict=True):
            assert g.dtype == dtype and g.shape == e.shape, name
            ours, theirs, magnitude = errors[name]
            ours.append((g.double().cpu() - e.cpu()).abs().max().item())
            theirs.append((lo.double().cpu() - e.cpu()).abs().max().item())
            magnitude.append(e.abs().max().item())
    for name, (ours, theirs, magnitude) in errors.items():
        bound = max(2 * max(theirs), torch.finfo(dtype).eps * max(magnitude))
        assert max(ours) <= bound, f"{name}: error {max(ours):.3g} vs bound {bound:.3g} (plain {max(theirs):.3g})"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_within_twice_plain(shape, dtype):
    _assert_within_twice_plain(shape, dtype, seeds=range(5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_gates(dtype):
    """fc2's weights x10: gates near 0 and 1, where the sigmoid's gradient is nearly 0."""
    _assert_within_twice_plain((17, 64, 4), dtype, seeds=range(3), logit_scale=10.0)


def test_only_timm_se_resnet_modules_are_fused():
    assert _se_excite.fusable_excitation(SEModule(64, rd_channels=4))
    assert not _se_excite.fusable_excitation(SEModule(64, rd_channels=4, norm_layer=torch.nn.BatchNorm2d))
    assert not _se_excite.fusable_excitation(SEModule(64, rd_channels=4, gate_layer="hard_sigmoid"))
    assert not _se_excite.fusable_excitation(SEModule(64, rd_channels=4, bias=False))
    assert not _se_excite.fusable_excitation(SEModule(4096, rd_channels=512))  # R past the kernels' tile
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _se_excite.excite(SEModule(64, rd_channels=4), torch.zeros(2, 64, 1, 1))

def test_the_fused_bottleneck_end_runs_the_excitation_kernels(monkeypatch):
    """On the Triton BatchNorm path a fused bf16 bottleneck's SE module runs as the excitation
    ops: none of its two convolutions or its sigmoid runs as a torch op."""
    from timm.models.resnet import Bottleneck

    from fastnl import ops

    monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    torch.manual_seed(0)
    block = Bottleneck(64, 16, attn_layer="se").to(DEVICE).train()
    assert se_bottleneck.fuse_se_tails(block) == 1
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 64, 6, 4, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    block.to(torch.bfloat16)
    with Spy():
        block(x).float().sum().backward()
    assert seen.count("se_excite") == 1 and seen.count("se_excite_bwd") == 1
    assert "sigmoid" not in seen and "sigmoid_backward" not in seen
    assert seen.count("convolution") == 3  # conv1, conv2, conv3: not the SE module's
    assert block.se.fc1.weight.grad is not None and block.se.fc2.bias.grad is not None


def test_opcheck():
    from fastnl.ops import _load_triton_kernels

    _load_triton_kernels()
    gen = torch.Generator().manual_seed(0)
    s, w1, b1, w2, b2 = (torch.randn(shape, generator=gen).to(DEVICE, torch.bfloat16)
                         for shape in ((3, 20), (5, 20), (5,), (20, 5), (20,)))
    gate, h = torch.ops.fastnl.se_excite.default(s, w1, b1, w2, b2)
    torch.library.opcheck(torch.ops.fastnl.se_excite.default, (s, w1, b1, w2, b2))
    torch.library.opcheck(torch.ops.fastnl.se_excite_bwd.default, (torch.randn_like(gate), gate, h, s, w1, w2))
    torch.testing.assert_close(h, torch.relu(s.double() @ w1.double().t() + b1.double()).float(),
                               rtol=1e-5, atol=1e-5)


def test_a_bf16_bottleneck_with_the_kernels_is_within_twice_the_module_layers_error(monkeypatch):
    """A whole fused bf16 bottleneck (the Triton end interpreted), its SE module on the kernels
    or as its layers: output, input and parameter gradients against the float64 timm block,
    the kernels' error at most twice the layers' (one bf16 ulp of the magnitude as a floor)."""
    from timm.models.resnet import Bottleneck

    from fastnl import ops

    torch.manual_seed(0)
    exact = Bottleneck(64, 16, attn_layer="se").to(DEVICE).double().train()
    fused = copy.deepcopy(exact).to(torch.bfloat16)
    assert se_bottleneck.fuse_se_tails(fused) == 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, 6, 4, generator=gen, dtype=torch.float64).to(torch.bfloat16).double().to(DEVICE)
    g = torch.randn(3, 64, 6, 4, generator=gen, dtype=torch.float64).to(torch.bfloat16).double().to(DEVICE)

    def run(block, dtype):
        xx = x.to(dtype).requires_grad_()
        out = block(xx)
        grads = torch.autograd.grad(out, (xx, *block.parameters()), g.to(dtype))
        return [out.detach(), *grads]

    reference = run(exact, torch.float64)
    monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    results = {}
    for kernels in (False, True):
        block = copy.deepcopy(fused)
        if not kernels:
            monkeypatch.setattr(se_bottleneck, "_kernel_excitation", se_bottleneck._excitation)
        results[kernels] = run(block, torch.bfloat16)
        monkeypatch.undo()
        monkeypatch.setattr(ops, "batch_norm_relu_backend", lambda *a: "triton")
    names = ["out", "grad_x", *(n for n, _ in exact.named_parameters())]
    for name, e, lo, ours in zip(names, reference, results[False], results[True], strict=True):
        ours_err, plain_err = ((t.double() - e).abs().max().item() for t in (ours, lo))
        floor = torch.finfo(torch.bfloat16).eps * e.abs().max().item()
        assert ours_err <= max(2 * plain_err, floor), f"{name}: {ours_err:.3g} vs layers {plain_err:.3g}"
