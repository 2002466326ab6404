"""Row kernels of the chunked attention engine: the softmax of a [rows, L] score tile and its
gradient, each in one pass over the tile (:mod:`fastnl.attention_chunked` runs the matmuls).

The scores ``S = Q_blk K^T`` arrive unscaled in float32 (a tensor-core GEMM with float32
output). ``softmax_rows`` writes ``P = softmax(scale * S)`` in the matmul dtype, the row
maximum ``M`` of ``sign(scale) * S`` (the scores' units) and the row sum ``Z`` of
``exp2((sign(scale) * S - M) * |scale| * log2(e))``. The maximum is taken off before the
scaling: the exponent then rounds relative to a score's distance from the row's maximum, which
is small where the probabilities are large (``exp2(scale * log2(e) * S - M)`` rounds relative
to the whole scaled score: in float32 at logits x10 that doubled dq's error in one seed of 10).
``softmax_grad_from_probs`` gives dS from a P the forward kept (when the whole score matrix
fits one tile); ``softmax_grad_rows`` recomputes P with the forward's expression from
the same S (the backward's GEMM gives the same bits as the forward's), so the backward's
probabilities round exactly like the forward's, and writes ``dS = scale * P * (dP - delta)``.
A row of up to ``ONE_PASS_MAX`` columns is held in registers (one read of S); longer rows are
reduced online and read twice.

On fake tensors (``torch._subclasses.FakeTensorMode``) the three functions allocate their
outputs and launch nothing: the memory count of :mod:`fastnl.benchmarks.memory` sees what the
kernels allocate, without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .nl_attention import exponent_scales
ONE_PASS_MAX = 16384  # columns a row program holds at once (64 KB of fp32 over its warps)
BLOCK_COLS = 4096  # column block of the two-pass path


@triton.jit
def _softmax_rows_fwd(S, P, M, Z, stride_s, stride_p, L, sign_scale, qk_scale,
                      BLOCK_L: tl.constexpr, ONE_PASS: tl.constexpr):
    """Grid (rows,): P[r] = exp2((sign_scale * S[r] - M[r]) * qk_scale) / Z[r], M[r] the row's
    largest sign_scale * S, Z[r] the sum; M, Z float32 per row."""
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    p_row = P + row * stride_p
    cols = tl.arange(0, BLOCK_L)
    if ONE_PASS:
        mask = cols < L
        s = tl.where(mask, tl.load(s_row + cols, mask=mask, other=0.0) * sign_scale, float("-inf"))
        m = tl.max(s, 0)
        e = tl.math.exp2(tl.where(mask, (s - m) * qk_scale, float("-inf")))
        z = tl.sum(e, 0)
        tl.store(p_row + cols, (e / z).to(P.dtype.element_ty), mask=mask)
    else:
        # online per lane, then across lanes: every lane sees a valid column in the first block
        m_lane = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
        z_lane = tl.zeros([BLOCK_L], dtype=tl.float32)
        for start in range(0, L, BLOCK_L):
            offs = start + cols
            valid = offs < L
            s = tl.where(valid, tl.load(s_row + offs, mask=valid, other=0.0) * sign_scale, float("-inf"))
            m_new = tl.maximum(m_lane, s)
            alpha = tl.math.exp2(tl.where(m_lane > float("-inf"), (m_lane - m_new) * qk_scale, float("-inf")))
            z_lane = z_lane * alpha + tl.math.exp2(tl.where(valid, (s - m_new) * qk_scale, float("-inf")))
            m_lane = m_new
        m = tl.max(m_lane, 0)
        z = tl.sum(z_lane * tl.math.exp2((m_lane - m) * qk_scale), 0)
        for start in range(0, L, BLOCK_L):
            offs = start + cols
            mask = offs < L
            s = tl.load(s_row + offs, mask=mask, other=0.0) * sign_scale
            tl.store(p_row + offs, (tl.math.exp2((s - m) * qk_scale) / z).to(P.dtype.element_ty), mask=mask)
    tl.store(M + row, m)
    tl.store(Z + row, z)


@triton.jit
def _softmax_rows_bwd(S, DP, M, Z, DELTA, P, DS, stride_s, stride_dp, stride_p, stride_ds, L,
                      sign_scale, qk_scale, sm_scale, BLOCK_L: tl.constexpr, FROM_P: tl.constexpr):
    """Grid (rows,): dS = sm_scale * P * (dP - DELTA) per row, with
    P = exp2((sign_scale * S - M) * qk_scale) / Z recomputed (the forward's bits) and written to
    P, or (FROM_P) read from the P the forward kept (S, M, Z unused)."""
    row = tl.program_id(0).to(tl.int64)
    delta = tl.load(DELTA + row)
    if not FROM_P:
        m = tl.load(M + row)
        z = tl.load(Z + row)
    cols = tl.arange(0, BLOCK_L)
    for start in range(0, L, BLOCK_L):
        offs = start + cols
        mask = offs < L
        dp = tl.load(DP + row * stride_dp + offs, mask=mask, other=0.0)
        if FROM_P:
            p = tl.load(P + row * stride_p + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(S + row * stride_s + offs, mask=mask, other=0.0)
            p = tl.math.exp2((s * sign_scale - m) * qk_scale) / z
            tl.store(P + row * stride_p + offs, p.to(P.dtype.element_ty), mask=mask)
        ds = (p * (dp - delta)) * sm_scale
        tl.store(DS + row * stride_ds + offs, ds.to(DS.dtype.element_ty), mask=mask)


KERNELS = {"rows_fwd": _softmax_rows_fwd, "rows_bwd": _softmax_rows_bwd}


def _warps(block_l: int) -> int:
    return 4 if block_l <= 2048 else (8 if block_l <= 8192 else 16)


def fwd_meta(seq_len: int) -> dict:
    """BLOCK_L, ONE_PASS and num_warps of ``_softmax_rows_fwd`` at L = seq_len."""
    one_pass = seq_len <= ONE_PASS_MAX
    block = max(16, triton.next_power_of_2(seq_len)) if one_pass else BLOCK_COLS
    return {"BLOCK_L": block, "ONE_PASS": one_pass, "num_warps": _warps(block)}


def bwd_meta(seq_len: int) -> dict:
    """BLOCK_L and num_warps of ``_softmax_rows_bwd`` at L = seq_len (a streaming kernel)."""
    block = min(BLOCK_COLS, max(16, triton.next_power_of_2(seq_len)))
    return {"BLOCK_L": block, "num_warps": _warps(block)}


def _launches(t: torch.Tensor) -> bool:
    """Whether to launch a kernel on ``t``: not on a fake tensor (allocations only)."""
    return not is_fake(t)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, R, L] tile with unit column stride as a [B * R, L] view."""
    if t.stride(-1) != 1 or (t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1)):
        raise ValueError("score tiles must be row-major [B, R, L] tensors")
    return t.view(-1, t.shape[-1])


def softmax_rows(s: torch.Tensor, scale: float, out_dtype: torch.dtype, out: torch.Tensor | None = None):
    """s: unscaled float32 scores [B, R, L] -> (P [B, R, L] in out_dtype, M [B, R], Z [B, R] fp32);
    P written into ``out`` (row-major [B, R, L] of out_dtype) where given."""
    B, R, L = s.shape
    s2 = _rows(s)
    if out is not None and (out.shape != s.shape or out.dtype != out_dtype):
        raise ValueError(f"out must be {tuple(s.shape)} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    p = torch.empty((B, R, L), device=s.device, dtype=out_dtype) if out is None else out
    _rows(p)  # row-major, as the kernel writes it
    m = torch.empty((B, R), device=s.device, dtype=torch.float32)
    z = torch.empty_like(m)
    if not _launches(s):
        return p, m, z
    meta = fwd_meta(L)
    _softmax_rows_fwd[(B * R,)](s2, p, m, z, s2.stride(0), L, L, *exponent_scales(scale),
                                BLOCK_L=meta["BLOCK_L"], ONE_PASS=meta["ONE_PASS"], num_warps=meta["num_warps"])
    return p, m, z


def softmax_grad_rows(s: torch.Tensor, dp: torch.Tensor, m: torch.Tensor, z: torch.Tensor, delta: torch.Tensor,
                      scale: float, out_dtype: torch.dtype):
    """Recomputed P and ``dS = scale * P * (dP - delta)``, both [B, R, L] in out_dtype, from the
    unscaled float32 scores s, dP = dO V^T (float32), the forward's M, Z and delta [B, R]."""
    B, R, L = s.shape
    s2, dp2 = _rows(s), _rows(dp)
    p = torch.empty((B, R, L), device=s.device, dtype=out_dtype)
    ds = torch.empty_like(p)
    m, z, delta = m.contiguous(), z.contiguous(), delta.contiguous()
    if not _launches(s):
        return p, ds
    meta = bwd_meta(L)
    _softmax_rows_bwd[(B * R,)](s2, dp2, m, z, delta, p, ds,
                                s2.stride(0), dp2.stride(0), L, L, L, *exponent_scales(scale), float(scale),
                                BLOCK_L=meta["BLOCK_L"], FROM_P=False, num_warps=meta["num_warps"])
    return p, ds


def softmax_grad_from_probs(p: torch.Tensor, dp: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``dS = scale * P * (dP - delta)`` [B, R, L] in p's dtype from the probabilities the forward
    kept (p, row-major) and dP (float32)."""
    B, R, L = p.shape
    p2, dp2 = _rows(p), _rows(dp)
    ds = torch.empty_like(p)
    delta = delta.contiguous()
    if not _launches(p):
        return ds
    meta = bwd_meta(L)
    _softmax_rows_bwd[(B * R,)](dp2, dp2, delta, delta, delta, p2, ds,
                                dp2.stride(0), dp2.stride(0), p2.stride(0), L, L, 1.0, 1.0, float(scale),
                                BLOCK_L=meta["BLOCK_L"], FROM_P=True, num_warps=meta["num_warps"])
    return ds
