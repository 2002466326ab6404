"""Fake (meta) and autograd registrations of ``torch.ops.fastnl.se_residual_relu``.

Called once by :func:`fastnl._extension.load` after the C++ library has defined the ops (a
library built before the op existed lacks it: nothing is registered then). Shapes: x and
shortcut [N, C, H, W] in one dtype, gate [N, C] in float32 (float64 for float64 x).
"""
from __future__ import annotations

import torch

_registered = False


def _fake_forward(x, gate, shortcut):
    return torch.empty_like(x)


def _fake_backward(grad_out, out, x, gate):
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, gate, _shortcut = inputs
    ctx.save_for_backward(output, x, gate)


def _backward(ctx, grad_out):
    out, x, gate = ctx.saved_tensors
    grad_x, grad_gate, grad_shortcut = torch.ops.fastnl.se_residual_relu_backward.default(grad_out, out, x, gate)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_gate if needs[1] else None, grad_shortcut if needs[2] else None)


def register() -> bool:
    """Register the fake kernels and the autograd formula; False where the library lacks the op."""
    global _registered
    if _registered:
        return True
    if not hasattr(torch.ops.fastnl, "se_residual_relu"):
        return False
    torch.library.register_fake("fastnl::se_residual_relu")(_fake_forward)
    torch.library.register_fake("fastnl::se_residual_relu_backward")(_fake_backward)
    torch.library.register_autograd("fastnl::se_residual_relu", _backward, setup_context=_setup_context)
    _registered = True
    return True
