"""Plain PyTorch references of the NLAM kernels (they materialise every intermediate).

These are the ground truth that the fused kernels in :mod:`fastnl.ops` are checked against,
and the ``impl="reference"`` model uses them.
"""
from __future__ import annotations

import torch


def nl_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Paper eq. (1): ``softmax(scale * q @ k^T, dim=-1) @ v``.

    q, k, v: [B, L, D]. Materialises the B x L x L score matrix (computed in float32 for
    half-precision inputs) and returns [B, L, D] in q's dtype.
    """
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.bmm(q.to(compute), k.to(compute).transpose(1, 2)) * scale
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p, v.to(compute)).to(q.dtype)


def channel_mlp(pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> torch.Tensor:
    """The shared MLP of eq. (3), ``W2 tanh(W1 p + b1) + b2``, on [..., C] -> [..., C]."""
    hidden = torch.tanh(torch.nn.functional.linear(pooled, w1, b1))
    return torch.nn.functional.linear(hidden, w2, b2)


def channel_attention(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None) -> torch.Tensor:
    """Paper eq. (3) applied to ``x`` = A_S of shape [B, N, C, H, W].

    GMP and GAP over H, W per frame, the shared tanh MLP, max over the N frames of the GMP
    branch plus mean over the N frames of the GAP branch, sigmoid, and ``x`` rescaled per
    channel (the same weights for every frame of a clip).
    """
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf = x.to(compute)
    gmp = xf.amax(dim=(3, 4))  # [B, N, C]
    gap = xf.mean(dim=(3, 4))
    w1, w2 = w1.to(compute), w2.to(compute)
    b1 = None if b1 is None else b1.to(compute)
    b2 = None if b2 is None else b2.to(compute)
    m = channel_mlp(gmp, w1, b1, w2, b2).amax(dim=1)
    a = channel_mlp(gap, w1, b1, w2, b2).mean(dim=1)
    weights = torch.sigmoid(m + a)  # [B, C]
    return (xf * weights[:, None, :, None, None]).to(x.dtype)


def nl_attention_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Paper eq. (1) as one writes it in plain PyTorch, ``softmax(scale * q @ k^T) @ v``, computed
    however the caller's autocast computes it (bmm in the autocast dtype, softmax in float32):
    the baseline a user would otherwise run (the scaling skipped at scale 1, as the paper has
    none). Materialises the B x L x L scores."""
    s = torch.bmm(q, k.transpose(1, 2))
    p = torch.softmax(s * scale if scale != 1.0 else s, dim=-1)
    return torch.bmm(p, v)


def se_residual_relu(x: torch.Tensor, gate: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """The tail of an SE-ResNet bottleneck as timm writes it: ``relu(x * gate + shortcut)`` with
    ``gate`` [N, C] broadcast over H, W, in the dtype those ops give (each op rounding)."""
    return torch.relu(x * gate.reshape(*gate.shape[:2], 1, 1) + shortcut)


def batch_norm_relu(x: torch.Tensor, running_mean, running_var, weight, bias, training: bool,
                    momentum: float, eps: float) -> torch.Tensor:
    """``relu(batch_norm(x))`` as a module pair ``BatchNorm2d``, ``ReLU`` computes it (the
    running statistics updated in place in training mode)."""
    return torch.relu(torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
                                                     momentum, eps))


def bn_se_residual_relu(y: torch.Tensor, running_mean, running_var, weight, bias, excite, shortcut: torch.Tensor,
                        training: bool, momentum: float, eps: float) -> torch.Tensor:
    """The end of an SE-ResNet bottleneck as timm writes it from its last convolution's output y:
    ``x = BatchNorm2d(y)``, ``relu(x * excite(x.mean((2, 3), keepdim=True)) + shortcut)``."""
    x = torch.nn.functional.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    gate = excite(x.mean((2, 3), keepdim=True))
    return se_residual_relu(x, gate, shortcut)


def se_excitation(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
    """timm's SE excitation after the squeeze, ``sigmoid(fc2(relu(fc1(s))))`` with 1x1-conv weights
    w1 [R, C, 1, 1], w2 [C, R, 1, 1], as a function of the squeeze s [N, C, 1, 1]; the weights
    cast to s's dtype, as autocast runs the convolutions."""
    def excite(s: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.nn.functional.conv2d(s, w1.to(s.dtype), b1.to(s.dtype)))
        return torch.sigmoid(torch.nn.functional.conv2d(h, w2.to(s.dtype), b2.to(s.dtype)))

    return excite
