"""Fake (meta) and autograd registrations of the ``torch.ops.fastnl`` channel-attention ops.

Called once by :func:`fastnl._extension.load` after the C++ library has defined the ops, so
they work under autograd and ``torch.compile``. Shapes: x [B, N, C, H, W], w1 [R, C],
b1 [R] or None, w2 [C, R], b2 [C] or None (paper eq. 3).
"""
from __future__ import annotations

import torch

_registered = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_channel_pool(x):
    B, N, C = x.shape[:3]
    dtype = _acc_dtype(x.dtype)
    return x.new_empty((B, N, C), dtype=dtype), x.new_empty((B, N, C), dtype=dtype)


def _fake_channel_attention(x, w1, b1, w2, b2):
    return torch.empty_like(x)


def _fake_channel_attention_backward(grad_out, x, w1, b1, w2, b2):
    R, C = w1.shape
    return (
        torch.empty_like(x),
        torch.empty_like(w1),
        w1.new_empty((R,), dtype=(b1 if b1 is not None else w1).dtype),
        torch.empty_like(w2),
        w2.new_empty((C,), dtype=(b2 if b2 is not None else w2).dtype),
    )


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)


def _backward(ctx, grad_out):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = torch.ops.fastnl.channel_attention_backward.default(
        grad_out, x, w1, b1, w2, b2
    )
    needs = ctx.needs_input_grad
    return (
        grad_x if needs[0] else None,
        grad_w1 if needs[1] else None,
        grad_b1 if b1 is not None and needs[2] else None,
        grad_w2 if needs[3] else None,
        grad_b2 if b2 is not None and needs[4] else None,
    )


def register() -> None:
    """Register fake kernels for every op and the autograd formula of ``channel_attention``."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("fastnl::channel_pool")(_fake_channel_pool)
    torch.library.register_fake("fastnl::channel_attention")(_fake_channel_attention)
    torch.library.register_fake("fastnl::channel_attention_backward")(_fake_channel_attention_backward)
    torch.library.register_autograd("fastnl::channel_attention", _backward, setup_context=_setup_context)
    _registered = True
