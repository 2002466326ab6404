"""Each equation of the paper's model against an independent float64 formula (einsum level)."""
import math

import pytest
import torch

from fastnl import reference
from fastnl.model import NLAM, NLTP, TemporalAvgPool


def _randomise_bn(bn: torch.nn.BatchNorm2d, gen: torch.Generator) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)


def _bn_eval(z, bn):
    """BatchNorm in eval mode on channel dim 1 of z."""
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return ((z - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _conv1x1(x, conv):
    """A 1x1 conv on [M, C, H, W] written as an einsum."""
    out = torch.einsum("oc,mchw->mohw", conv.weight[:, :, 0, 0], x)
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1, 1)
    return out


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_nlam_matches_equations_1_to_3(impl, scale):
    gen = torch.Generator().manual_seed(0)
    b, n, c, h, w = 2, 3, 32, 3, 2
    module = NLAM(c, reduction=4, scale=scale, impl=impl).double().eval()
    _randomise_bn(module.w0_bn, gen)
    x = torch.randn(b * n, c, h, w, generator=gen, dtype=torch.float64)
    out = module(x, n)

    # Eq. (1): every position i of the clip (all frames) attends to every position j.
    xs = x.view(b, n, c, h, w)
    pos = lambda t: t.view(b, n, -1, h * w).permute(0, 1, 3, 2).reshape(b, n * h * w, -1)  # noqa: E731
    A, B, D = (pos(_conv1x1(x, conv)) for conv in (module.a, module.b, module.d))
    logits = scale * torch.einsum("bic,bjc->bij", A, B)
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    Y = torch.einsum("bij,bjc->bic", weights, D)  # [b, N*H*W, C']
    Y = Y.view(b, n, h, w, -1).permute(0, 1, 4, 2, 3).reshape(b * n, -1, h, w)
    # Eq. (2): A_S = W0(Y) + X, W0 a 1x1 conv followed by BatchNorm.
    a_s = _bn_eval(_conv1x1(Y, module.w0), module.w0_bn) + x
    # Eq. (3): shared MLP W2 tanh(W1 .) on GMP and GAP of each frame; max / mean over frames.
    W1, W2 = module.mlp_w1.weight, module.mlp_w2.weight
    a_s5 = a_s.view(b, n, c, h, w)
    gmp = a_s5.amax(dim=(3, 4))
    gap = a_s5.mean(dim=(3, 4))
    mlp = lambda p: torch.einsum("cr,bnr->bnc", W2, torch.tanh(torch.einsum("rc,bnc->bnr", W1, p)))  # noqa: E731
    gate = torch.sigmoid(mlp(gmp).amax(1) + mlp(gap).mean(1))
    expected = (a_s5 * gate[:, None, :, None, None]).view(b * n, c, h, w)
    assert xs.shape == (b, n, c, h, w)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_nlam_starts_as_channel_attention_of_identity():
    """With W0's BatchNorm at zero (its initial state) the spatial part is the identity."""
    torch.manual_seed(0)
    module = NLAM(16, reduction=4, impl="reference").double()
    x = torch.randn(4, 16, 2, 2, dtype=torch.float64)
    a_s = module.spatial(x, 2).view(2, 16, 2, 2, 2).transpose(1, 2).reshape(4, 16, 2, 2)
    torch.testing.assert_close(a_s, x, rtol=0, atol=0)


def test_nltp_matches_equations_4_to_6():
    gen = torch.Generator().manual_seed(1)
    b, n, c, h, w = 2, 4, 8, 3, 2
    module = NLTP(c).double().eval()
    _randomise_bn(module.w_bn, gen)
    f = torch.randn(b * n, c, h, w, generator=gen, dtype=torch.float64)
    out = module(f, n)

    vec = lambda t: t.reshape(b, n, -1)  # noqa: E731  each frame map flattened to a vector
    theta, phi, g = (vec(_conv1x1(f, conv)) for conv in (module.theta, module.phi, module.g))
    h_ij = torch.einsum("bik,bjk->bij", theta, phi)  # eq. (5)
    y = torch.einsum("bij,bjk->bik", h_ij, g) / n  # eq. (6)
    y = y.reshape(b * n, -1, h, w)
    f_prime = (_bn_eval(_conv1x1(y, module.w), module.w_bn) + f).view(b, n, c, h, w).mean(1)  # eq. (4)
    expected = f_prime.mean(dim=(2, 3))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_temporal_average_pooling():
    f = torch.randn(6, 5, 2, 3, dtype=torch.float64)
    out = TemporalAvgPool()(f, 3)
    expected = torch.stack([f[0:3].sum(0), f[3:6].sum(0)]).sum(dim=(2, 3)) / (3 * 6)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_attention_against_softmax_formula(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, dtype=dtype) for _ in range(3))
    out = reference.nl_attention(q, k, v, 0.7)
    qd, kd, vd = q.double(), k.double(), v.double()
    e = torch.exp(0.7 * torch.einsum("bid,bjd->bij", qd, kd))
    expected = torch.einsum("bij,bjd->bid", e / e.sum(-1, keepdim=True), vd)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_reference_channel_attention_with_biases():
    torch.manual_seed(0)
    b, n, c, h, w, r = 2, 3, 6, 2, 2, 2
    x = torch.randn(b, n, c, h, w, dtype=torch.float64)
    w1, b1, w2, b2 = (torch.randn(*s, dtype=torch.float64) for s in ((r, c), (r,), (c, r), (c,)))
    out = reference.channel_attention(x, w1, b1, w2, b2)
    expected = torch.empty_like(x)
    for bi in range(b):
        m = torch.stack([w2 @ torch.tanh(w1 @ x[bi, t].amax(dim=(1, 2)) + b1) + b2 for t in range(n)])
        a = torch.stack([w2 @ torch.tanh(w1 @ x[bi, t].mean(dim=(1, 2)) + b1) + b2 for t in range(n)])
        gate = 1 / (1 + torch.exp(-(m.max(0).values + a.mean(0))))
        expected[bi] = x[bi] * gate[None, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert math.isfinite(out.abs().max().item())
