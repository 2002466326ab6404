"""SE-ResNet50's bottleneck with its tail in one op (the fused model's backbone blocks)."""
from __future__ import annotations

import torch
from timm.layers import SEModule
from timm.models.resnet import Bottleneck
from torch import nn

from fastnl import ops


class FusedSEBottleneck(Bottleneck):
    """timm's Bottleneck whose tail, the SE rescale, the residual sum and the ReLU, runs as
    :func:`fastnl.ops.se_residual_relu`: one pass where plain PyTorch makes three forward and
    five backward. The same modules and parameters, so the same state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        se = self.se
        gate = se.gate(se.fc2(se.act(se.bn(se.fc1(x.mean((2, 3), keepdim=True))))))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return ops.se_residual_relu(x, gate, shortcut)


def fusable(block: nn.Module) -> bool:
    """A timm SE bottleneck whose forward :class:`FusedSEBottleneck` reproduces: no drop path,
    no max-pool squeeze, a ReLU at the end."""
    return (type(block) is Bottleneck and isinstance(block.se, SEModule) and not block.se.add_maxpool
            and block.drop_path is None and type(block.act3) is nn.ReLU)


def fuse_se_tails(backbone: nn.Module) -> int:
    """Make every fusable SE bottleneck of ``backbone`` a :class:`FusedSEBottleneck` (in place,
    parameters untouched); returns how many. Other blocks are left as they are."""
    count = 0
    for block in backbone.modules():
        if fusable(block):
            block.__class__ = FusedSEBottleneck
            count += 1
    return count
