"""Non-Local Attention Module (NLAM), paper section 3.1, eq. (1)-(3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastnl import ops
from fastnl._residual_conv import ShortcutSink, projection_with_residual, residual_to_sink
from fastnl.vocabulary import MODEL_IMPLS as IMPLS


def backends_for(impl: str) -> tuple[str, str]:
    """(attention backend, channel-attention backend) used by a model built with ``impl``. The
    reference model's attention is the plain PyTorch one: float32 without autocast (the ground
    truth of ``fastnl check``), and under autocast what a plain PyTorch model computes there."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return ("auto", "auto") if impl == "fused" else ("plain", "reference")


class NLAM(nn.Module):
    """NLAM on the frame maps of a clip: spatial attention over all N*H*W positions, then
    channel attention shared by the N frames.

    Spatial (eq. 1-2): ``A, B, D = a(X), b(X), d(X)`` (1x1 convs C -> C'),
    ``Y = softmax(scale * A^T B) D``, ``A_S = BN(W0(Y)) + X`` with the BatchNorm after W0
    initialised to zero, so the module starts as the identity.
    Channel (eq. 3): ``A_C = sigmoid(max_n MLP(GMP(A_S)) + mean_n MLP(GAP(A_S))) * A_S`` with
    the shared MLP ``W2 tanh(W1 .)`` (C -> C/r -> C).

    forward(x [B*N, C, H, W], frames=N) -> [B*N, C, H, W].
    """

    # the MLP's weights go to the channel-attention op as they are (it runs without autocast)
    outside_autocast = ("mlp_w1", "mlp_w2")

    def __init__(self, channels: int, *, inter_channels: int | None = None, reduction: int = 16,
                 scale: float = 1.0, impl: str = "fused"):
        super().__init__()
        inter = inter_channels or channels // 2
        if inter < 1 or reduction < 1:
            raise ValueError(f"inter_channels and reduction must be >= 1, got {inter}, {reduction}")
        self.channels, self.inter_channels, self.scale = channels, inter, float(scale)
        self.attention_backend, self.channel_backend = backends_for(impl)
        # the fused model projects x to q, k, v in one GEMM whose backward adds the residual's
        # gradient (fastnl._residual_conv.projection_with_residual); the same parameters
        self.stacked_projections = impl == "fused"
        self.a = nn.Conv2d(channels, inter, 1)
        # A bias on b would add a_i^T beta to every logit of row i: softmax ignores it.
        self.b = nn.Conv2d(channels, inter, 1, bias=False)
        self.d = nn.Conv2d(channels, inter, 1)
        self.w0 = nn.Conv2d(inter, channels, 1, bias=False)
        self.w0_bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.w0_bn.weight)
        nn.init.zeros_(self.w0_bn.bias)
        hidden = max(1, channels // reduction)
        self.mlp_w1 = nn.Linear(channels, hidden, bias=False)
        self.mlp_w2 = nn.Linear(hidden, channels, bias=False)

    def spatial(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Eq. (1)-(2): x [B*N, C, H, W] -> A_S as [B, C, N*H*W]."""
        bn, c, h, w = x.shape
        b = bn // frames
        length = frames * h * w
        x_cl = x.reshape(b, frames, c, h * w).transpose(1, 2).reshape(b, c, length)
        cp = self.inter_channels
        sink = None
        if self.stacked_projections and not torch.compiler.is_compiling():
            # one [3C', C] projection; x's gradient from it and from the residual in one GEMM
            sink = ShortcutSink(owned=False)
            qkv = projection_with_residual(x_cl.unsqueeze(-1), [self.a.weight, self.b.weight, self.d.weight],
                                           [self.a.bias, None, self.d.bias], sink).squeeze(-1)
            projections = qkv.split(cp, dim=1)
        else:
            projections = [F.conv1d(x_cl, conv.weight.view(cp, c, 1), conv.bias) for conv in (self.a, self.b, self.d)]
        # q, k, v: [B, L, C'] views of the [B, C', L] conv outputs (no permute copies).
        q, k, v = (t.transpose(1, 2) for t in projections)
        y = ops.nl_attention(q, k, v, scale=self.scale, backend=self.attention_backend)  # [B, L, C']
        z = F.conv1d(y.transpose(1, 2), self.w0.weight.view(c, cp, 1))  # [B, C, L]
        z = self.w0_bn(z.unsqueeze(-1)).squeeze(-1)
        return z + x_cl if sink is None else residual_to_sink(z, x_cl, sink)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bn, c, h, w = x.shape
        if bn % frames:
            raise ValueError(f"NLAM input has {bn} frame maps, not a multiple of frames={frames}")
        b = bn // frames
        a_s = self.spatial(x, frames).view(b, c, frames, h, w).transpose(1, 2).contiguous()
        out = ops.channel_attention(a_s, self.mlp_w1.weight, None, self.mlp_w2.weight, None,
                                    backend=self.channel_backend)
        return out.view(bn, c, h, w)
