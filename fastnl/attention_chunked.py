"""Memory-efficient attention in plain PyTorch: query blocks, saved log-sum-exp, recompute.

``backend="torch"`` of :func:`fastnl.ops.nl_attention`. Extra memory is O(block * L + L * D)
instead of the reference's O(L * L): the forward keeps only O and the row log-sum-exp, and the
backward recomputes each block's probabilities. Works on any device and dtype (accumulates in
float32 for half-precision inputs, in float64 for float64).
"""
from __future__ import annotations

import torch

MAX_BLOCK = 1024
MIN_BLOCK = 64
# A block's score tile ([B, block, L]) holds at most this many elements per batch entry (16 MB
# in float32); the backward keeps two such tiles (P and dS) alive at once.
TILE_ELEMENTS = 1 << 22


def default_block(seq_len: int) -> int:
    """The query block for L = ``seq_len``: the largest power of two in [MIN_BLOCK, MAX_BLOCK]
    whose [block, L] tile stays within TILE_ELEMENTS, so the tiles shrink as L grows and the
    extra memory stays a fraction of the O(L * D) inputs and gradients (1024 up to L = 4096,
    512 at 8192, 256 at 16384)."""
    block = MAX_BLOCK
    while block > MIN_BLOCK and block * seq_len > TILE_ELEMENTS:
        block //= 2
    return block


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
            p = torch.bmm(q[:, start:stop].to(cdt) * scale, kc.transpose(1, 2))
            row_max = p.amax(dim=-1, keepdim=True)
            p.sub_(row_max).exp_()
            row_sum = p.sum(dim=-1, keepdim=True)
            out[:, start:stop] = torch.bmm(p, vc).div_(row_sum).to(q.dtype)
            lse[:, start:stop] = (row_max + row_sum.log()).squeeze(-1)
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
            p = torch.baddbmm(-lse[:, start:stop].unsqueeze(-1), qb * scale, kc.transpose(1, 2)).exp_()
            dv.baddbmm_(p.transpose(1, 2), dob)
            # dS = P * (dP - delta); the factor `scale` is applied to the [block, D] products instead.
            ds = torch.bmm(dob, vc.transpose(1, 2)).sub_(delta).mul_(p)
            del p
            dq[:, start:stop] = torch.bmm(ds, kc).mul_(scale)
            dk.baddbmm_(ds.transpose(1, 2), qb, alpha=scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def nl_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
                         block: int | None = None) -> torch.Tensor:
    """``softmax(scale * q @ k^T) @ v`` for q, k, v [B, L, D], processed ``block`` query rows at a
    time (default: :func:`default_block` of L)."""
    if block is None:
        block = default_block(q.shape[1])
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return _ChunkedAttention.apply(q, k, v, float(scale), int(block))
