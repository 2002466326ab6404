"""SE-ResNet50's bottleneck with its tail in one op (the fused model's backbone blocks)."""
from __future__ import annotations

import torch
from timm.layers import SEModule
from timm.models.resnet import Bottleneck
from torch import nn

from fastnl import ops
from fastnl._running_stats import count_batch
from fastnl._residual_conv import GradMeeting, ShortcutSink, conv_with_shortcut, meeting_conv, plain_1x1, strided_1x1


class _SpatialMean(torch.autograd.Function):
    """``x.mean((2, 3), keepdim=True)`` whose backward returns ``grad / (H*W)`` broadcast over
    the map, a stride-0 view, where torch's ``mean`` backward writes it out at full size. The
    autograd engine adds the view into the tail op's ``grad_x`` in one pass: the SE squeeze's
    gradient then costs one read and one write of the map, not four passes (the full-size
    division, then an add of two full-size tensors). The values are the same to the last bit:
    every element is the same division."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        height, width = ctx.shape[2], ctx.shape[3]
        return (grad / (height * width)).expand(ctx.shape)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """The SE squeeze, ``x.mean((2, 3), keepdim=True)`` of a [B, C, H, W] map, with the lean
    backward of :class:`_SpatialMean`."""
    if x.dim() != 4:
        raise ValueError(f"spatial_mean: expected a [B, C, H, W] map, got shape {tuple(x.shape)}")
    return _SpatialMean.apply(x)


def _triton_bn(bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``bn`` (applied to x) is a training-mode ``nn.BatchNorm2d`` that the Triton
    kernels run (:func:`fastnl.ops.batch_norm_relu_backend`)."""
    return (type(bn) is nn.BatchNorm2d and bn.training
            and ops.batch_norm_relu_backend(x, True, bn.weight, bn.bias) == "triton")


def _count_batch(bn: nn.BatchNorm2d) -> tuple:
    """The module's bookkeeping of one training call, as ``nn.BatchNorm2d.forward`` does it:
    ``num_batches_tracked`` counted; returns (running_mean, running_var, momentum factor), the
    factor of ``momentum=None`` the cumulative average's."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        count_batch(bn.num_batches_tracked, now=bn.momentum is None)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    tracked = bn.track_running_stats
    return (bn.running_mean if tracked else None), (bn.running_var if tracked else None), factor


def bn_relu(bn: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(bn(x))``, where ``bn`` is a training-mode ``nn.BatchNorm2d`` and ``act`` an
    ``nn.ReLU`` that :func:`fastnl.ops.batch_norm_relu` runs as one op (on CUDA: the Triton
    kernels), with the module's own rules: ``num_batches_tracked`` counted, ``momentum=None``
    as a cumulative average, the running statistics updated once per call. Anything else (eval
    mode, SyncBatchNorm, another activation, the CPU) runs the two modules as they are."""
    if type(act) is not nn.ReLU or not _triton_bn(bn, x):
        return act(bn(x))
    running_mean, running_var, factor = _count_batch(bn)
    return ops.batch_norm_relu(x, running_mean, running_var, bn.weight, bn.bias, training=True, momentum=factor,
                               eps=bn.eps, backend="triton")


def _excitation(se: SEModule):
    """The SE module's layers after its squeeze, as a function of the squeeze."""
    return lambda squeeze: se.gate(se.fc2(se.act(se.bn(se.fc1(squeeze)))))


def _kernel_excitation(se: SEModule):
    """:func:`_excitation` on the Triton kernels (:mod:`fastnl._se_excite`: one kernel forward and
    two backward for the module's two convolutions and two activations) where the module is
    timm's SE-ResNet one and the squeeze in half precision, else the module's layers."""
    from fastnl import _se_excite

    plain = _excitation(se)
    if not _se_excite.fusable_excitation(se):
        return plain
    return lambda squeeze: _se_excite.excite(se, squeeze) if squeeze.dtype in _se_excite.HALF else plain(squeeze)


def _triton_end(bn: nn.Module, y: torch.Tensor, shortcut: torch.Tensor) -> bool:
    """Whether :func:`bn_se_residual_relu` runs the bottleneck end's Triton op."""
    return _triton_bn(bn, y) and shortcut.dtype == y.dtype and not torch.compiler.is_compiling()


def bn_se_residual_relu(bn: nn.Module, se: SEModule, y: torch.Tensor, shortcut: torch.Tensor,
                        shortcut_sink: ShortcutSink | None = None,
                        shortcut_bn: nn.Module | None = None) -> torch.Tensor:
    """``relu(se(bn(y)) + shortcut)``, a bottleneck's end from its last convolution's output, where
    ``bn`` is a training-mode ``nn.BatchNorm2d`` that the Triton kernels run (the normalised map
    never written: :func:`fastnl.ops.bn_se_residual_relu`), with the module's rules as in
    :func:`bn_relu`; otherwise ``bn``, the SE module and the one-pass tail op
    (:func:`fastnl.ops.se_residual_relu`), as also under ``torch.compile`` (the op's autograd
    spans the SE module through Python state that a traced graph cannot hold). With the Triton
    op, ``shortcut_sink`` takes the shortcut's gradient (see :func:`fastnl.ops.bn_se_residual_relu`).
    ``shortcut_bn``: the shortcut's own BatchNorm module (a downsampling bottleneck's, the shortcut
    then its convolution's output), applied in the Triton op as it reads the shortcut where that
    BatchNorm is one the kernels run too (:class:`fastnl.ops.ShortcutNorm`), else before it."""
    norm = None
    if shortcut_bn is not None:
        if _triton_end(bn, y, shortcut) and _triton_bn(shortcut_bn, shortcut):
            running_mean, running_var, factor = _count_batch(shortcut_bn)
            norm = ops.ShortcutNorm(running_mean, running_var, shortcut_bn.weight, shortcut_bn.bias, factor,
                                    shortcut_bn.eps)
        else:
            shortcut = shortcut_bn(shortcut)
    if _triton_end(bn, y, shortcut):
        running_mean, running_var, factor = _count_batch(bn)
        return ops.bn_se_residual_relu(y, running_mean, running_var, bn.weight, bn.bias, _kernel_excitation(se),
                                       shortcut, training=True, momentum=factor, eps=bn.eps, backend="triton",
                                       shortcut_sink=shortcut_sink, shortcut_norm=norm)
    x = bn(y)
    return ops.se_residual_relu(x, _excitation(se)(spatial_mean(x)), shortcut)


class FusedStem(nn.Module):
    """The backbone's stem, conv1 -> bn1 -> act1 -> maxpool, with bn1 + act1 as :func:`bn_relu`
    (a view over the backbone's own modules: it holds no parameters of its own in a state_dict
    that matters, the model's keys stay the backbone's)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module, pool: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act, self.pool = conv, bn, act, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(bn_relu(self.bn, self.act, self.conv(x)))


class FusedSEBottleneck(Bottleneck):
    """timm's Bottleneck whose tail, the SE rescale, the residual sum and the ReLU, runs as
    :func:`fastnl.ops.se_residual_relu`: one pass where plain PyTorch makes three forward and
    five backward. The SE squeeze's gradient is added to the op's in one pass
    (:func:`spatial_mean`). In training on CUDA the first two BatchNorm + ReLU pairs run as one
    op each (:func:`bn_relu`) and the last BatchNorm joins the tail, SE module included
    (:func:`bn_se_residual_relu`); where the shortcut is the block's input, that end hands the
    shortcut's gradient to the first convolution, whose backward GEMM adds it in
    (:mod:`fastnl._residual_conv`). The same modules and parameters, so the same state_dict."""

    def _conv_then_bn(self) -> bool:
        """Whether the shortcut is timm's downsampling, a 1x1 convolution and its BatchNorm."""
        ds = self.downsample
        return (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
                and isinstance(ds[1], nn.BatchNorm2d))

    def _meeting(self, x: torch.Tensor) -> GradMeeting | None:
        """A :class:`GradMeeting` for x's two gradients where the shortcut is a 1x1 convolution
        (strided, or layer1's of stride 1) and its BatchNorm (timm's downsampling), in training
        with autograd."""
        ds = self.downsample
        if (self._conv_then_bn() and (strided_1x1(ds[0]) or plain_1x1(ds[0])) and plain_1x1(self.conv1)
                and x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            return GradMeeting(ds[0].stride[0])
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, sink, meeting = x, None, None
        if (self.downsample is None and x.requires_grad and torch.is_grad_enabled() and plain_1x1(self.conv1)
                and _triton_end(self.bn3, x, x)):
            # the input is the shortcut: its two gradients are summed in the first convolution's
            # backward GEMM, not by autograd (see fastnl._residual_conv)
            sink = ShortcutSink()
        else:
            # a strided shortcut: its gradient of x is added into conv1's on the grid positions
            meeting = self._meeting(x)
        if sink is not None:
            h = conv_with_shortcut(self.conv1, x, sink)
        elif meeting is not None:
            h = meeting_conv(self.conv1, x, meeting)
        else:
            h = self.conv1(x)
        x = bn_relu(self.bn1, self.act1, h)
        x = self.conv2(x)
        if isinstance(self.drop_block, nn.Identity):
            x = self.aa(bn_relu(self.bn2, self.act2, x))
        else:
            x = self.aa(self.act2(self.drop_block(self.bn2(x))))
        x = self.conv3(x)
        shortcut_bn = None
        if self._conv_then_bn():  # the BatchNorm is applied in the end's op where it can be
            shortcut_bn = self.downsample[1]
            conv = self.downsample[0]
            shortcut = meeting_conv(conv, shortcut, meeting) if meeting is not None else conv(shortcut)
        elif self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return bn_se_residual_relu(self.bn3, self.se, x, shortcut, sink, shortcut_bn)


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
