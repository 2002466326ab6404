"""Memory-efficient attention in plain PyTorch: query blocks, saved log-sum-exp, recompute.

``backend="torch"`` of :func:`fastnl.ops.nl_attention`. Extra memory is O(block * L + L * D)
instead of the reference's O(L * L): the forward keeps only O and the row log-sum-exp, and the
backward recomputes each block's probabilities. Works on any device and dtype (accumulates in
float32 for half-precision inputs, in float64 for float64).
"""
from __future__ import annotations

import torch

DEFAULT_BLOCK = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, block: int):
        cdt = _compute_dtype(q.dtype)
        kc, vc = k.to(cdt), v.to(cdt)
        B, L, _ = q.shape
        out = torch.empty(B, L, v.shape[-1], device=q.device, dtype=q.dtype)
        lse = torch.empty(B, L, device=q.device, dtype=cdt)
        for start in range(0, L, block):
            stop = min(start + block, L)
            s = torch.bmm(q[:, start:stop].to(cdt), kc.transpose(1, 2)).mul_(scale)
            row_lse = torch.logsumexp(s, dim=-1)
            p = s.sub_(row_lse.unsqueeze(-1)).exp_()
            out[:, start:stop] = torch.bmm(p, vc).to(q.dtype)
            lse[:, start:stop] = row_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        cdt = lse.dtype
        kc, vc = k.to(cdt), v.to(cdt)
        dq = torch.empty(q.shape, device=q.device, dtype=cdt)
        dk = torch.zeros(k.shape, device=k.device, dtype=cdt)
        dv = torch.zeros(v.shape, device=v.device, dtype=cdt)
        L = q.shape[1]
        for start in range(0, L, block):
            stop = min(start + block, L)
            qb = q[:, start:stop].to(cdt)
            dob = grad_out[:, start:stop].to(cdt)
            delta = (dob * out[:, start:stop].to(cdt)).sum(-1, keepdim=True)
            s = torch.bmm(qb, kc.transpose(1, 2)).mul_(scale)
            p = s.sub_(lse[:, start:stop].unsqueeze(-1)).exp_()
            dv.add_(torch.bmm(p.transpose(1, 2), dob))
            ds = torch.bmm(dob, vc.transpose(1, 2)).sub_(delta).mul_(p).mul_(scale)
            dq[:, start:stop] = torch.bmm(ds, kc)
            dk.add_(torch.bmm(ds.transpose(1, 2), qb))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def nl_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
                         block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``softmax(scale * q @ k^T) @ v`` for q, k, v [B, L, D], processed ``block`` query rows at a time."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return _ChunkedAttention.apply(q, k, v, float(scale), int(block))
