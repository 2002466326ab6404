"""Temporal aggregation of frame maps into a clip descriptor: NLTP (paper eq. 4-6) and TP_avg."""
from __future__ import annotations

import torch
from torch import nn

from fastnl._residual_conv import ShortcutSink, projection_with_residual, residual_to_sink

TEMPORAL = ("nltp", "avg")


class NLTP(nn.Module):
    """Non-Local Temporal Pooling, eq. (4)-(6).

    theta, phi, g: 1x1 convs C -> C' on each frame map, flattened to vectors of C'*H*W;
    ``h = theta^T phi`` (N x N, no softmax), ``Y = (1/N) h g``,
    ``F' = mean_n(BN(W(Y)) + F)`` (W a 1x1 conv C' -> C; its BatchNorm starts at zero as in
    the original non-local block, so training starts from plain temporal averaging),
    then spatial average pooling.

    forward(f [B*N, C, H, W], frames=N) -> [B, C].
    """

    def __init__(self, channels: int, *, inter_channels: int | None = None, stacked_projections: bool = False):
        super().__init__()
        inter = inter_channels or channels // 2
        # theta, phi and g as one [3C', C] projection whose backward adds the residual's
        # gradient of f (fastnl._residual_conv.projection_with_residual); the same parameters
        self.stacked_projections = stacked_projections
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.w = nn.Conv2d(inter, channels, 1, bias=False)
        self.w_bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.w_bn.weight)
        nn.init.zeros_(self.w_bn.bias)

    def forward(self, f: torch.Tensor, frames: int) -> torch.Tensor:
        bn, c, h, w = f.shape
        b = bn // frames
        sink = None
        if self.stacked_projections and not torch.compiler.is_compiling():
            sink = ShortcutSink(owned=False)
            convs = (self.theta, self.phi, self.g)
            projections = projection_with_residual(f, [conv.weight for conv in convs], [conv.bias for conv in convs],
                                                   sink).split(self.theta.out_channels, dim=1)
        else:
            projections = (self.theta(f), self.phi(f), self.g(f))
        theta, phi, g = (t.reshape(b, frames, -1) for t in projections)
        # The frame affinities sum over C'*H*W products: at least float32, even under autocast.
        acc = torch.promote_types(theta.dtype, torch.float32)
        with torch.autocast(device_type=f.device.type, enabled=False):
            affinity = torch.bmm(theta.to(acc), phi.to(acc).transpose(1, 2)) / frames  # [B, N, N]
            y = torch.bmm(affinity, g.to(acc))
        y = y.to(g.dtype).reshape(bn, -1, h, w)
        z = self.w_bn(self.w(y))
        z = z + f if sink is None else residual_to_sink(z, f, sink)
        return z.reshape(b, frames, c, h, w).mean(dim=(1, 3, 4))


class TemporalAvgPool(nn.Module):
    """TP_avg: mean over frames and positions. forward(f [B*N, C, H, W], frames=N) -> [B, C]."""

    def forward(self, f: torch.Tensor, frames: int) -> torch.Tensor:
        bn, c, h, w = f.shape
        return f.reshape(bn // frames, frames, c, h, w).mean(dim=(1, 3, 4))


def build_temporal(kind: str, channels: int, stacked_projections: bool = False) -> nn.Module:
    if kind == "nltp":
        return NLTP(channels, stacked_projections=stacked_projections)
    if kind == "avg":
        return TemporalAvgPool()
    raise ValueError(f"temporal must be one of {TEMPORAL}, got {kind!r}")
