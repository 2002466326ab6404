"""Autograd of the fused bottleneck end, ``relu(x * excite(mean_hw(x)) + shortcut)`` with
``x = batch_norm(y)``, over the Triton ops of ``fastnl.kernels.bn_se_tail``.

Two autograd Functions around the caller's ``excite`` (the SE module's layers, left to
autograd): ``_BnSqueeze`` (y -> the squeeze, with the batch statistics) and ``_Tail`` (y, the
gate and the shortcut -> out). The BatchNorm's backward needs the gradient of x from both the
tail and the squeeze; x is never formed, so ``_Tail``'s backward returns no gradient for y and
leaves its per-image sums in a ``_Handoff`` that ``_BnSqueeze``'s backward, which autograd runs
after it (the squeeze's gradient comes through the gate), completes into y's gradient in one
pass. With ``xhat = (y - mean) / std``, ``x = xhat * w + b`` and ``g = dout * (out > 0)``:

- dgate[n, c] = sum_hw g * x
- dx = g * gate[n, c] + dsqueeze[n, c] / S
- BatchNorm: db = sum dx, dw = sum dx * xhat (per channel, from the [N, C] sums and the
  forward's per-image mean of xhat), dy = scale * (dx - db / M - xhat * dw / M), M = N S.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _Handoff:
    """What ``_Tail``'s backward leaves for ``_BnSqueeze``'s: g (the shortcut's gradient), the
    [2, N, C] float32 sums of g and g * xhat, and the gate [N, C] (in its own dtype)."""

    __slots__ = ("g", "sums", "gate")

    def __init__(self):
        self.g = self.sums = self.gate = None


class _BnSqueeze(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, eps, handoff):
        # squeeze = mean_hw(x) [N, C] in y's dtype, pooled = mean_hw(xhat) float32
        stats, pooled, squeeze = torch.ops.fastnl.bn_pool.default(y, weight, bias, float(eps))
        ctx.save_for_backward(y, weight, stats, pooled)
        ctx.handoff = handoff
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return squeeze.view(*y.shape[:2], 1, 1), stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_squeeze, _grad_stats):
        y, weight, stats, pooled = ctx.saved_tensors
        handoff = ctx.handoff
        N, C, H, W = y.shape
        dsq = (torch.zeros((N, C), device=y.device, dtype=torch.float32) if grad_squeeze is None
               else grad_squeeze.reshape(N, C).contiguous())
        if handoff.g is None:  # the squeeze reaches the output only through the gate
            raise RuntimeError("bn_se_residual_relu: the squeeze has a gradient but the output had none; "
                               "the squeeze must only feed the gate")
        g, sums, gate = handoff.g, handoff.sums, handoff.gate
        handoff.g = handoff.sums = handoff.gate = None
        # dbias = sum_n gate * sum g + dsq, dweight = sum_n gate * sum g xhat + dsq * pooled, the
        # coefficients of dy = coef_p * g + coef_b * (y - mean) + coef_q, in one small kernel
        coef_p, coef_q, coef_b, dweight, dbias = torch.ops.fastnl.se_tail_bwd_coefs.default(
            gate, sums, dsq, pooled, stats, H * W)
        dy = torch.ops.fastnl.se_tail_bwd_apply.default(g, y, stats, coef_p, coef_q, coef_b)
        return dy, dweight.to(weight.dtype), dbias.to(weight.dtype), None, None


class _Tail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, stats, gate, shortcut, handoff, sink, shortcut_weight, shortcut_bias, shortcut_stats):
        N, C = y.shape[:2]
        gate2d = gate.reshape(N, C).contiguous()  # the kernels read row n at n * C, as float32
        out = torch.ops.fastnl.se_tail.default(y, stats, gate2d, shortcut, shortcut_stats)
        norm = shortcut_stats is not None
        # a normalised shortcut is kept (its BatchNorm's backward reads it), a plain one is not
        ctx.save_for_backward(y, out, stats, gate2d, *((shortcut, shortcut_weight, shortcut_stats) if norm else ()))
        ctx.handoff, ctx.sink, ctx.norm = handoff, sink, norm
        ctx.gate_shape = gate.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, out, stats, gate2d, *norm = ctx.saved_tensors
        from fastnl.ops import _load_triton_kernels

        if not _load_triton_kernels().batch_norm.dense_layout(grad_out):
            grad_out = grad_out.contiguous()
        z, z_weight, z_stats = norm if ctx.norm else (None, None, None)
        g, sums, dgate = torch.ops.fastnl.se_tail_bwd_partial.default(grad_out, out, y, stats, gate2d.dtype, z, z_stats)
        handoff = ctx.handoff
        handoff.g, handoff.sums, handoff.gate = g, sums, gate2d
        needs = ctx.needs_input_grad
        dz_weight = dz_bias = None
        if ctx.norm:
            # the shortcut's BatchNorm backward: its gate is 1, its per-channel sums are row 0
            # (sum g, shared with the tail) and row 2 of the partial pass's
            coef_p, coef_q, coef_b, dz_weight, dz_bias = torch.ops.fastnl.se_tail_bwd_coefs.default(
                None, sums, None, None, z_stats, y.shape[2] * y.shape[3], 2)
            g = torch.ops.fastnl.se_tail_bwd_apply.default(g, z, z_stats, coef_p, coef_q, coef_b) if needs[3] else None
            dz_weight, dz_bias = dz_weight.to(z_weight.dtype), dz_bias.to(z_weight.dtype)
        elif ctx.sink is not None and needs[3]:  # the block's first convolution adds g into its GEMM
            ctx.sink.g, g = g, None
        return (None, None, dgate.view(ctx.gate_shape) if needs[2] else None,
                g if needs[3] else None, None, None, dz_weight if needs[6] else None,
                dz_bias if needs[7] else None, None)


def bn_se_residual_relu(y, weight, bias, eps, excite, shortcut, shortcut_sink=None, shortcut_bn=None):
    """(out, stats, shortcut_stats): ``relu(x * excite(mean_hw(x)) + shortcut)`` with x the
    training-mode BatchNorm of y (its batch statistics, affine ``weight``, ``bias``), through the
    Triton ops; stats as ``fastnl.kernels.batch_norm`` returns them (row 0 the mean, row 2 the
    unbiased variance). y: dense [N, C, H, W] in float32 / float16 / bfloat16; shortcut y's
    shape and dtype, dense. ``excite`` maps the [N, C, 1, 1] squeeze (y's dtype) to the gate,
    [N, C, 1, 1] or [N, C]. ``shortcut_sink`` (a ``fastnl._residual_conv.ShortcutSink``): the
    shortcut's gradient goes there, not to autograd (the shortcut being the block's input, whose
    first convolution adds it in). ``shortcut_bn`` = (weight, bias, eps): the shortcut added is
    the training-mode BatchNorm of ``shortcut`` (with y's strides), applied in the tail and never
    written; its statistics are returned as the third value (None without)."""
    from fastnl.ops import _check_gate, _load_triton_kernels

    _load_triton_kernels()  # defines the ops
    if shortcut_bn is not None and shortcut_sink is not None:
        raise ValueError("a shortcut sink takes the gradient of the block's input; a normalised shortcut is not that")
    z_weight, z_bias, z_stats = None, None, None
    if shortcut_bn is not None:
        z_weight, z_bias, z_eps = shortcut_bn
        if shortcut.stride() != y.stride():
            shortcut = torch.empty_like(y).copy_(shortcut)  # the kernels read both with y's strides
        # (their gradient is in _Tail's backward, which makes the BatchNorm's)
        z_stats = torch.ops.fastnl.bn_stats.default(shortcut.detach(), z_weight.detach(), z_bias.detach(),
                                                    float(z_eps))
    handoff = _Handoff()
    squeeze, stats = _BnSqueeze.apply(y, weight, bias, eps, handoff)
    gate = excite(squeeze)
    _check_gate(gate, *y.shape[:2], what="excite must return the gate as")
    if squeeze.requires_grad and not _reaches(gate.grad_fn, squeeze.grad_fn):
        # y's gradient through the tail is completed in the squeeze's backward: without that
        # path it would silently be left out
        raise ValueError("excite must compute the gate from the squeeze it is given (its gradient flows back "
                         "through the squeeze); use backend='reference' for a gate made otherwise")
    out = _Tail.apply(y, stats, gate, shortcut, handoff, shortcut_sink, z_weight, z_bias, z_stats)
    return out, stats, z_stats


def _reaches(node, target, limit: int = 4096) -> bool:
    """Whether autograd node ``target`` is among ``node``'s inputs, transitively (at most
    ``limit`` nodes looked at: an SE module's excitation is a handful)."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n is None or n in seen:
            continue
        if n is target:
            return True
        seen.add(n)
        todo.extend(next_fn for next_fn, _ in n.next_functions)
    return False
