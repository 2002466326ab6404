"""Autograd of the SE module's excitation on the Triton kernels of ``fastnl.kernels.se_excite``:
``gate = sigmoid(fc2(relu(fc1(squeeze))))`` in one forward kernel and two backward kernels (see
that module), for the bottleneck ends that run on the Triton BatchNorm kernels."""
from __future__ import annotations

import torch
from timm.layers import SEModule
from timm.layers.activations import Sigmoid
from torch import nn
from torch.autograd.function import once_differentiable

HALF = (torch.float16, torch.bfloat16)  # the kernels' dtypes (see fastnl.kernels.se_excite)


class _Excite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, squeeze, w1, b1, w2, b2):
        gate, h = torch.ops.fastnl.se_excite.default(squeeze, w1, b1, w2, b2)
        ctx.save_for_backward(gate, h, squeeze, w1, w2)
        return gate

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gate):
        gate, h, squeeze, w1, w2 = ctx.saved_tensors
        dsq, dw1, db1, dw2, db2 = torch.ops.fastnl.se_excite_bwd.default(grad_gate.contiguous(), gate, h, squeeze,
                                                                         w1, w2)
        return dsq, dw1, db1, dw2, db2  # in the weights' dtype (the squeeze's)


def _plain_1x1_with_bias(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None)


def fusable_excitation(se: nn.Module) -> bool:
    """Whether ``se`` is timm's SEModule as SE-ResNet50 has it, whose excitation the kernels
    compute: 1x1 convolutions with bias, no BatchNorm between, a ReLU and a sigmoid gate, at
    most ``MAX_R`` reduced units."""
    from fastnl.ops import _load_triton_kernels

    return (type(se) is SEModule and _plain_1x1_with_bias(se.fc1) and _plain_1x1_with_bias(se.fc2)
            and isinstance(se.bn, nn.Identity) and type(se.act) is nn.ReLU and type(se.gate) in (Sigmoid, nn.Sigmoid)
            and se.fc1.out_channels <= _load_triton_kernels().se_excite.MAX_R)


def excite(se: SEModule, squeeze: torch.Tensor) -> torch.Tensor:
    """``se.gate(se.fc2(se.act(se.fc1(squeeze))))`` for a [N, C, 1, 1] squeeze of a
    :func:`fusable_excitation` module, on the kernels; the weights cast to the squeeze's dtype
    as autocast casts them (a no-op where they are cast already). Returns [N, C, 1, 1]."""
    from fastnl.ops import _load_triton_kernels

    _load_triton_kernels()  # defines the ops
    N, C = squeeze.shape[:2]
    if squeeze.dtype not in HALF:
        raise TypeError(f"excite: the squeeze must be float16 or bfloat16, got {squeeze.dtype}")
    R = se.fc1.out_channels
    dtype = squeeze.dtype
    w1, w2 = se.fc1.weight.reshape(R, C).to(dtype), se.fc2.weight.reshape(C, R).to(dtype)
    b1, b2 = se.fc1.bias.to(dtype), se.fc2.bias.to(dtype)
    gate = _Excite.apply(squeeze.reshape(N, C).contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
                         b2.contiguous())
    return gate.view(N, C, 1, 1)
