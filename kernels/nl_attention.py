"""Flash-style Triton kernels for the NLAM spatial attention (paper eq. 1), head dim up to 1024.

``O = softmax(scale * Q K^T) V`` for Q, K, V of shape [B, L, D] with any strides (the
channel-first [B, C', L] output of a 1x1 conv is read in place). One head of a large
dimension: the head dimension is tiled twice, in ``BLOCK_DK`` slices when the scores are
reduced over D, and in ``BLOCK_DV``-wide output column chunks (one program per chunk), so the
fp32 accumulator stays in registers without spilling. When ``BLOCK_DV`` covers D the scores
are computed once per tile; narrower chunks recompute them once per chunk (see
``recompute_factor``), and the autotuner picks between both among the spill-free configs.

The forward saves only O and, per row, the maximum M of the scores (times the sign of the
scale) and the softmax sum Z; the backward recomputes the probabilities as
``exp2((s - M) * |scale| * log2(e)) / Z``, rounded as the forward normalised them (a saved
log-sum-exp adds its own rounding at large logits, which float32 gradients showed). The maximum
comes off the raw scores before the scaling, so that an exponent rounds relative to its
score's distance from the maximum (see ``exponent_scales``). Backward kernels:
``_nl_attn_bwd_preprocess`` (delta = rowsum(dO * O)), ``_nl_attn_bwd_dkdv`` (one program per
key block and column chunk) and ``_nl_attn_bwd_dq``.
The running row maximum keeps every exponent <= 0, so scales far from 1 neither overflow nor
produce NaN.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastnl._library import define_op_pair
from fastnl.vocabulary import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM
from fastnl.vocabulary import triton_head_dim_ok
from fastnl.vocabulary import triton_interpreted as _interpreted

LOG2E = 1.4426950408889634


def autotune_enabled() -> bool:
    """Autotuning runs on a GPU unless FASTNL_AUTOTUNE=0; never under the interpreter."""
    return not _interpreted() and os.environ.get("FASTNL_AUTOTUNE", "1") != "0"


def dk_block(head_dim: int) -> int:
    """Width of the D slices of the score reduction: the largest of 64, 32, 16 dividing D."""
    for block in (64, 32, 16):
        if head_dim % block == 0:
            return block
    raise ValueError(f"head dimension must be a multiple of 16, got {head_dim}")


def _chunk_cap(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# Up to this head dim one output chunk covers D in the dK/dV kernel, which then also adds dQ
# with float32 atomics (FUSE_DQ): no separate dQ kernel recomputing S and dP.
FUSED_DQ_MAX_HEAD_DIM = 128


def fuses_dq(head_dim: int) -> bool:
    """Whether the backward computes dQ inside the dK/dV kernel (atomics) at this head dim."""
    return head_dim <= FUSED_DQ_MAX_HEAD_DIM


def recompute_factor(head_dim: int, block_dv: int) -> int:
    """How many times a program grid of this chunk width computes each score tile."""
    return triton.cdiv(head_dim, block_dv)


def executed_flops(seq_len: int, head_dim: int, block_dv: dict | None = None) -> dict:
    """Flops the kernels execute for one clip (L = seq_len, D = head_dim) and the useful ones
    (forward 4 L^2 D; backward 10 L^2 D, the recomputation of the scores included), with the
    chunk width BLOCK_DV of each kernel ("fwd", "dkdv", "dq"; default: the defaults' for bf16).
    The forward computes S once per chunk and P V once; the dK/dV kernel S and dP once per
    chunk, dV and dK once; the dQ kernel S and dP once per chunk and dQ once (or, where
    ``fuses_dq``, the dK/dV kernel adds dQ from its own S and dP: 10 L^2 D in all)."""
    widths = {k: default_config(k, head_dim).kwargs["BLOCK_DV"] for k in ("fwd", "dkdv", "dq")}
    widths.update(block_dv or {})
    r_fwd, r_kv, r_q = (recompute_factor(head_dim, widths[k]) for k in ("fwd", "dkdv", "dq"))
    unit = seq_len * seq_len * head_dim
    fwd = (2 * r_fwd + 2) * unit
    bwd = (4 * r_kv + 6 if fuses_dq(head_dim) else 4 * r_kv + 4 + 4 * r_q + 2) * unit
    return {"fwd": fwd, "bwd": bwd, "fwd_useful": 4 * unit, "bwd_useful": 10 * unit,
            "fwd_ratio": fwd / (4 * unit), "bwd_ratio": bwd / (10 * unit)}


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32. UPCAST multiplies in fp32 (the exact products of bf16 inputs): the
    Triton 3.8 interpreter's tl.dot multiplies the raw bits of bf16 operands."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _load_rows(base, offs_r, offs_c, stride_r, stride_c, n_rows, n_cols):
    """[len(offs_r), len(offs_c)] tile, zero outside n_rows x n_cols."""
    mask = (offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _dot_rows(a_base, stride_ar, stride_ad, offs_a, b_base, stride_br, stride_bd, offs_b, L,
              HEAD_DIM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``A[offs_a] @ B[offs_b]^T`` reduced over all HEAD_DIM columns in BLOCK_DK slices (fp32);
    BLOCK_DK divides HEAD_DIM, rows at or beyond L read as zero."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in tl.range(0, HEAD_DIM, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        a = tl.load(a_base + offs_a[:, None] * stride_ar + offs_d[None, :] * stride_ad,
                    mask=offs_a[:, None] < L, other=0.0)
        bt = tl.load(b_base + offs_d[:, None] * stride_bd + offs_b[None, :] * stride_br,
                     mask=offs_b[None, :] < L, other=0.0)
        acc = _mma(a, bt, acc, PRECISION, UPCAST)
    return acc


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


# Up to this padded head dim, when one output chunk covers D, the forward holds its Q tile in
# registers for the whole key loop (one load instead of one per key block) and reduces the
# scores in one tl.dot over all of D.
Q_ON_CHIP_MAX_HEAD_DIM = tl.constexpr(256)


def keeps_q_on_chip(head_dim: int, block_dv: int) -> bool:
    """Whether the forward with chunk width ``block_dv`` keeps the Q tile on chip at this D."""
    return head_dim <= block_dv <= Q_ON_CHIP_MAX_HEAD_DIM.value


@triton.jit
def _nl_attn_fwd_inner(acc, m_i, l_i, q_base, k_base, v_base, offs_m, offs_dv,
                       stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, L,
                       sign_scale, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr):
    """Online softmax over all key blocks for one query block and one output column chunk. The V
    tile of a key block is loaded before its softmax, so the load overlaps the exponentials.
    Where one chunk covers D (at most Q_ON_CHIP_MAX_HEAD_DIM wide), Q stays on chip."""
    Q_ON_CHIP: tl.constexpr = (BLOCK_DV >= HEAD_DIM) and (BLOCK_DV <= Q_ON_CHIP_MAX_HEAD_DIM)
    if Q_ON_CHIP:
        q = _load_rows(q_base, offs_m, offs_dv, stride_qm, stride_qd, L, HEAD_DIM)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if Q_ON_CHIP:
            kt = tl.load(k_base + offs_dv[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                         mask=(offs_dv[:, None] < HEAD_DIM) & (offs_n[None, :] < L), other=0.0)
            s = _mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
        else:
            s = _dot_rows(q_base, stride_qm, stride_qd, offs_m, k_base, stride_kn, stride_kd, offs_n, L,
                          HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DK, PRECISION, UPCAST)
        v = _load_rows(v_base, offs_n, offs_dv, stride_vn, stride_vd, L, HEAD_DIM)
        valid_n = offs_n[None, :] < L
        s = tl.where(valid_n, s * sign_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(tl.where(valid_n, (s - m_new[:, None]) * qk_scale, float("-inf")))
        alpha = tl.math.exp2(tl.where(m_i > float("-inf"), (m_i - m_new) * qk_scale, float("-inf")))
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _nl_attn_fwd(Q, K, V, O, MZ,
                 stride_qb, stride_qm, stride_qd, stride_kb, stride_kn, stride_kd,
                 stride_vb, stride_vn, stride_vd, stride_ob, stride_om, stride_od,
                 L, sign_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), cdiv(D, BLOCK_DV), B): O[b, m-block, chunk], and per row the
    maximum M = MZ[b, 0] of sign_scale * s (the scores' units) and the softmax sum Z = MZ[b, 1]
    of exp2((sign_scale * s - M) * qk_scale)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _nl_attn_fwd_inner(acc, m_i, l_i, Q + b * stride_qb, K + b * stride_kb, V + b * stride_vb,
                                       offs_m, offs_dv, stride_qm, stride_qd, stride_kn, stride_kd,
                                       stride_vn, stride_vd, L, sign_scale, qk_scale,
                                       HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, PRECISION, UPCAST)
    acc = acc / l_i[:, None]
    o_ptr = O + b * stride_ob + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM))
    if pid_c == 0:
        tl.store(MZ + b * 2 * L + offs_m, m_i, mask=offs_m < L)
        tl.store(MZ + b * 2 * L + L + offs_m, l_i, mask=offs_m < L)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _nl_attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_om, stride_od, stride_dob, stride_dom, stride_dod, L,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), B): DELTA[b, m] = sum_d O[b, m, d] * dO[b, m, d] in fp32."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in tl.range(0, HEAD_DIM, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        o = _load_rows(O + b * stride_ob, offs_m, offs_d, stride_om, stride_od, L, HEAD_DIM)
        do = _load_rows(DO + b * stride_dob, offs_m, offs_d, stride_dom, stride_dod, L, HEAD_DIM)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _nl_attn_bwd_dkdv(Q, K, V, DO, MZ, DELTA, DK, DV, DQACC,
                      stride_qb, stride_qm, stride_qd, stride_kb, stride_kn, stride_kd,
                      stride_vb, stride_vn, stride_vd, stride_dob, stride_dom, stride_dod,
                      stride_gb, stride_gn, stride_gd,
                      L, sign_scale, qk_scale, sm_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      FUSE_DQ: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Grid (cdiv(L, BLOCK_N), cdiv(D, BLOCK_DV), B): dK and dV of one key block, one column chunk.

    dV = P^T dO, dK = scale * dS^T Q with dS = P * (dO V^T - delta); P^T is recomputed from the
    saved row maximum and sum as exp2((sign_scale * s - M) * qk_scale) / Z, as the forward
    normalised it. DK and DV share the strides (stride_gb, stride_gn, stride_gd). FUSE_DQ (one
    chunk covers D): the program also adds its key block's share dS K of dQ (unscaled) into the
    float32 [B, L, D] DQACC with atomics, so S and dP are computed once per tile in the whole
    backward (FlashAttention-2's scheme).
    """
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_base = Q + b * stride_qb
    k_base = K + b * stride_kb
    v_base = V + b * stride_vb
    do_base = DO + b * stride_dob
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if FUSE_DQ:
        tl.static_assert(BLOCK_DV >= HEAD_DIM)
        k_rows = _load_rows(k_base, offs_n, offs_dv, stride_kn, stride_kd, L, HEAD_DIM)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid_m = offs_m < L
        st = _dot_rows(k_base, stride_kn, stride_kd, offs_n, q_base, stride_qm, stride_qd, offs_m, L,
                       HEAD_DIM, BLOCK_N, BLOCK_M, BLOCK_DK, PRECISION, UPCAST)
        m_row = tl.load(MZ + b * 2 * L + offs_m, mask=valid_m, other=0.0)
        z_row = tl.load(MZ + b * 2 * L + L + offs_m, mask=valid_m, other=1.0)
        pt = tl.where(valid_m[None, :],
                      tl.math.exp2((st * sign_scale - m_row[None, :]) * qk_scale) / z_row[None, :], 0.0)
        do = _load_rows(do_base, offs_m, offs_dv, stride_dom, stride_dod, L, HEAD_DIM)
        dv = _mma(pt.to(do.dtype), do, dv, PRECISION, UPCAST)
        dpt = _dot_rows(v_base, stride_vn, stride_vd, offs_n, do_base, stride_dom, stride_dod, offs_m, L,
                        HEAD_DIM, BLOCK_N, BLOCK_M, BLOCK_DK, PRECISION, UPCAST)
        delta = tl.load(DELTA + b * L + offs_m, mask=valid_m, other=0.0)
        dst = pt * (dpt - delta[None, :])
        q = _load_rows(q_base, offs_m, offs_dv, stride_qm, stride_qd, L, HEAD_DIM)
        dk = _mma(dst.to(q.dtype), q, dk, PRECISION, UPCAST)
        if FUSE_DQ:
            dq = _mma(tl.trans(dst.to(k_rows.dtype)), k_rows,
                      tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32), PRECISION, UPCAST)
            dq_ptr = DQACC + b * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_dv[None, :]
            tl.atomic_add(dq_ptr, dq, mask=valid_m[:, None] & (offs_dv[None, :] < HEAD_DIM))
    mask = (offs_n[:, None] < L) & (offs_dv[None, :] < HEAD_DIM)
    offs = b * stride_gb + offs_n[:, None] * stride_gn + offs_dv[None, :] * stride_gd
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _nl_attn_bwd_dq(Q, K, V, DO, MZ, DELTA, DQ,
                    stride_qb, stride_qm, stride_qd, stride_kb, stride_kn, stride_kd,
                    stride_vb, stride_vn, stride_vd, stride_dob, stride_dom, stride_dod,
                    stride_gb, stride_gm, stride_gd,
                    L, sign_scale, qk_scale, sm_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), cdiv(D, BLOCK_DV), B): dQ = scale * dS K for one query block, one chunk."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_base = Q + b * stride_qb
    k_base = K + b * stride_kb
    v_base = V + b * stride_vb
    do_base = DO + b * stride_dob
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    valid_m = offs_m < L
    m_row = tl.load(MZ + b * 2 * L + offs_m, mask=valid_m, other=0.0)
    z_row = tl.load(MZ + b * 2 * L + L + offs_m, mask=valid_m, other=1.0)
    delta = tl.load(DELTA + b * L + offs_m, mask=valid_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = _dot_rows(q_base, stride_qm, stride_qd, offs_m, k_base, stride_kn, stride_kd, offs_n, L,
                      HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DK, PRECISION, UPCAST)
        p = tl.where(offs_n[None, :] < L,
                     tl.math.exp2((s * sign_scale - m_row[:, None]) * qk_scale) / z_row[:, None], 0.0)
        dp = _dot_rows(do_base, stride_dom, stride_dod, offs_m, v_base, stride_vn, stride_vd, offs_n, L,
                       HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_DK, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        k = _load_rows(k_base, offs_n, offs_dv, stride_kn, stride_kd, L, HEAD_DIM)
        dq = _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
    mask = valid_m[:, None] & (offs_dv[None, :] < HEAD_DIM)
    offs = b * stride_gb + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd
    tl.store(DQ + offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configurations: (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages); every one of them is
# compiled ahead of time for sm_90 by tests/test_triton_aot.py (spill-free, <= 227 KB shared).
# ---------------------------------------------------------------------------------------------

PREPROCESS_BLOCK_M = 64

# Measured for bf16 at D=512 and 1024 (sm_90, triton 3.8): a 512-wide chunk computes the scores
# once per tile at D <= 512 and only fits with 16 warps and BLOCK_N <= 32 (128 registers, no
# spill); 64 x 512 with BLOCK_N=64 spills at 8 and 16 warps, as do (128, 64, 64, 4 warps).
_SPACES = {
    "fwd": [
        (64, 64, 256, 8, 2),
        (64, 32, 512, 16, 2),
        (128, 32, 256, 16, 2),
        (128, 64, 128, 8, 2),
        (64, 64, 128, 4, 2),
    ],
    "dkdv": [
        (64, 64, 128, 8, 2),
        (32, 64, 256, 16, 2),
        (32, 128, 128, 8, 2),
        (64, 64, 64, 4, 2),
    ],
    "dq": [
        (64, 64, 128, 8, 2),
        (64, 32, 512, 16, 2),
        (64, 32, 256, 8, 2),
        (128, 64, 128, 8, 3),
    ],
}
# fp32 inputs multiply in full fp32 (no tensor cores): only small tiles stay spill-free, with
# ptxas 12.8 (triton 3.6) as with 12.9 (triton 3.8) at the model's head dims 32..1024 (64x32
# tiles over 128-wide chunks with 8 warps spilled 8 bytes on 12.8 at D >= 256; 32x32 tiles over
# 128-wide chunks spill 8 bytes on 12.8 at D >= 512 with 4 warps, none with 8: 80 and 122
# registers in fwd and dq there, 113 and 120 on 12.9).
_SPACES_FP32 = {
    "fwd": [(32, 32, 128, 8, 1), (64, 32, 64, 4, 1), (32, 32, 64, 4, 1)],
    "dkdv": [(16, 32, 64, 4, 1)],
    "dq": [(32, 32, 64, 4, 1), (32, 32, 128, 8, 1)],
}


def _space(kernel: str, dtype: torch.dtype):
    return (_SPACES_FP32 if dtype == torch.float32 else _SPACES)[kernel]
# The block of rows a program owns: query rows for fwd and dq, key rows for dkdv.
_OWN_BLOCK = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}


def _make_config(spec) -> triton.Config:
    bm, bn, bdv, warps, stages = spec
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_DV": bdv}, num_warps=warps, num_stages=stages)


def _fit(spec, head_dim: int):
    """The spec with BLOCK_DV clipped to the padded head dim (one chunk covers a small D)."""
    bm, bn, bdv, warps, stages = spec
    return bm, bn, min(bdv, _chunk_cap(head_dim)), warps, stages


def keep(kernel: str, config: triton.Config, seq_len: int) -> bool:
    """Skip row blocks of more than 64 rows that are larger than the (power-of-2 padded) sequence."""
    rows = config.kwargs[_OWN_BLOCK[kernel]]
    return rows <= max(64, triton.next_power_of_2(seq_len))


def candidate_configs(kernel: str, head_dim: int, seq_len: int | None = None,
                      dtype: torch.dtype = torch.bfloat16) -> list[triton.Config]:
    """The configurations the autotuner may pick for ``kernel`` in {"fwd", "dkdv", "dq"} at
    D = head_dim, inputs of ``dtype`` (and L = seq_len; None: every L)."""
    specs = []
    for spec in _space(kernel, dtype):
        spec = _fit(spec, head_dim)
        if spec not in specs:
            specs.append(spec)
    configs = [_make_config(s) for s in specs]
    if kernel == "dkdv" and fuses_dq(head_dim):  # one chunk must cover D
        configs = [c for c in configs if c.kwargs["BLOCK_DV"] >= head_dim]
    return [c for c in configs if seq_len is None or keep(kernel, c, seq_len)]


def default_config(kernel: str, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> triton.Config:
    """The configuration used when autotuning is off (and under the interpreter): the first of the space."""
    return _make_config(_fit(_space(kernel, dtype)[0], head_dim))


def _autotuned(kernel: str, fn):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return candidate_configs(kernel, args["HEAD_DIM"], args["L"], args["Q"].dtype)

    configs = [_make_config(s) for s in _SPACES[kernel] + _SPACES_FP32[kernel]]
    return triton.autotune(configs, key=["L", "HEAD_DIM"], prune_configs_by={"early_config_prune": prune})(fn)


_TUNED = {kernel: _autotuned(kernel, fn) for kernel, fn in
          (("fwd", _nl_attn_fwd), ("dkdv", _nl_attn_bwd_dkdv), ("dq", _nl_attn_bwd_dq))}
KERNELS = {"fwd": _nl_attn_fwd, "dkdv": _nl_attn_bwd_dkdv, "dq": _nl_attn_bwd_dq,
           "preprocess": _nl_attn_bwd_preprocess}


_FORCED: dict = {}


class forced_configs:
    """Context manager: launch the given kernels ("fwd", "dkdv", "dq") with exactly these
    ``triton.Config`` s instead of autotuning or the defaults (for checking and timing every
    configuration the autotuner may pick). Not thread-safe; nests."""

    def __init__(self, **configs: triton.Config):
        bad = set(configs) - {"fwd", "dkdv", "dq"}
        if bad:
            raise ValueError(f"forced_configs takes fwd, dkdv, dq; got {sorted(bad)}")
        self.configs, self.saved = configs, None

    def __enter__(self):
        self.saved = dict(_FORCED)
        _FORCED.update(self.configs)
        return self

    def __exit__(self, *exc):
        _FORCED.clear()
        _FORCED.update(self.saved)
        return False


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_TUNED_FILES: dict = {}


def tuned_config(kernel: str, head_dim: int, seq_len: int, dtype: torch.dtype) -> triton.Config | None:
    """The configuration that the file FASTNL_TUNED_CONFIGS names (the GPU suite's
    ``tuned-configs.json``: the fastest measured configuration per kernel, dtype, D and L) holds
    for this kernel, dtype and D at the L nearest to ``seq_len`` (log scale); None without one.
    A configuration the file names that is not among ``candidate_configs`` is ignored."""
    import json
    import math

    path = os.environ.get("FASTNL_TUNED_CONFIGS")
    if not path:
        return None
    if path not in _TUNED_FILES:
        try:
            with open(path) as f:
                _TUNED_FILES[path] = json.load(f)["configs"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"FASTNL_TUNED_CONFIGS={path} is unusable: {err}") from err
    entries = [e for e in _TUNED_FILES[path] if e.get("kernel") == kernel and e.get("D") == head_dim
               and e.get("dtype") == _DTYPE_NAMES.get(dtype)]
    if not entries:
        return None
    best = min(entries, key=lambda e: abs(math.log2(max(e.get("L", 1), 1) / max(seq_len, 1))))
    spec = (best["BLOCK_M"], best["BLOCK_N"], best["BLOCK_DV"], best["num_warps"], best["num_stages"])
    allowed = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_DV"], c.num_warps, c.num_stages)
               for c in candidate_configs(kernel, head_dim, dtype=dtype)}
    return _make_config(spec) if spec in allowed else None


def _launch(kernel: str, grid_of, args, constants, head_dim: int, dtype: torch.dtype, seq_len: int = 0) -> None:
    """Launch ``kernel`` with a forced configuration, else the tuned one (FASTNL_TUNED_CONFIGS),
    else autotuned, or with its default configuration when autotuning is off."""
    config = _FORCED.get(kernel) or tuned_config(kernel, head_dim, seq_len, dtype)
    if config is None and autotune_enabled():
        _TUNED[kernel][lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_DV"])](*args, **constants)
        return
    config = config or default_config(kernel, head_dim, dtype)
    meta = config.kwargs
    KERNELS[kernel][grid_of(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_DV"])](
        *args, **constants, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _constants(head_dim: int, dtype: torch.dtype) -> dict:
    return {"HEAD_DIM": head_dim, "BLOCK_DK": dk_block(head_dim), "PRECISION": _precision(dtype),
            "UPCAST": _interpreted() and dtype == torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Launchers and the ops
# ---------------------------------------------------------------------------------------------


def exponent_scales(scale: float) -> tuple[float, float]:
    """(sign_scale, qk_scale) of the kernels: the sign of ``scale`` (the scores are flipped,
    exactly, so that M is the row's largest scaled score) and ``|scale| * log2(e)``. The row
    maximum comes off the raw scores before they are scaled, so an exponent rounds relative to
    its score's distance from the maximum, not to the whole scaled score."""
    scale = float(scale)
    return (-1.0 if scale < 0 else 1.0), abs(scale) * LOG2E


def nl_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Forward: q, k, v [B, L, D] (any strides) -> (O [B, L, D] in q's dtype, MZ [B, 2, L] fp32:
    the row maximum M of sign(scale) * s and the softmax sum Z; the row log-sum-exp is
    ``|scale| * M + ln Z``)."""
    B, L, D = q.shape
    out = torch.empty((B, L, D), device=q.device, dtype=q.dtype)
    mz = torch.empty((B, 2, L), device=q.device, dtype=torch.float32)
    args = (q, k, v, out, mz, *q.stride(), *k.stride(), *v.stride(), *out.stride(), L, *exponent_scales(scale))
    _launch("fwd", lambda bm, bn, bdv: (triton.cdiv(L, bm), triton.cdiv(D, bdv), B), args,
            _constants(D, q.dtype), D, q.dtype, L)
    return out, mz


def nl_attention_bwd(q, k, v, out, mz, grad_out, scale: float):
    """Backward: returns (dQ, dK, dV), each [B, L, D] in q's dtype, from the saved O and MZ."""
    B, L, D = q.shape
    delta = torch.empty((B, L), device=q.device, dtype=torch.float32)
    _nl_attn_bwd_preprocess[(triton.cdiv(L, PREPROCESS_BLOCK_M), B)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), L,
        HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DK=dk_block(D))
    dq = torch.empty((B, L, D), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    scales = (L, *exponent_scales(scale), float(scale))
    constants = _constants(D, q.dtype)
    fused = fuses_dq(D)
    dq_acc = torch.zeros((B, L, D), device=q.device, dtype=torch.float32) if fused else delta
    _launch("dkdv", lambda bm, bn, bdv: (triton.cdiv(L, bn), triton.cdiv(D, bdv), B),
            (q, k, v, grad_out, mz, delta, dk, dv, dq_acc, *common, *dk.stride(), *scales),
            {**constants, "FUSE_DQ": fused}, D, q.dtype, L)
    if fused:
        return dq_acc.mul_(scale).to(q.dtype), dk, dv
    _launch("dq", lambda bm, bn, bdv: (triton.cdiv(L, bm), triton.cdiv(D, bdv), B),
            (q, k, v, grad_out, mz, delta, dq, *common, *dq.stride(), *scales), constants, D, q.dtype, L)
    return dq, dk, dv


# The kernels as ``torch.library`` ops (``torch.ops.fastnl``), so that autograd, opcheck and
# torch.compile (fullgraph; the ops are opaque to it) see one op per direction. The forward op
# returns O and the row M and Z that the backward reads; nl_attention_triton returns O only.
# custom_op rather than triton_op: under TRITON_INTERPRET=1 ``torch.library.wrap_triton`` hands
# back the interpreted kernel unwrapped, so tracing a triton_op launches it on fake tensors
# ("Cannot access data pointer of Tensor"), and the CPU tests could not compile through it.
# Defined once per process (a second import of this file, e.g. as ``kernels`` beside
# ``fastnl.kernels``, reuses the ops of the first).

_FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor mz, float scale) "
               "-> (Tensor, Tensor, Tensor)")


def _fake_fwd(q, k, v, scale):
    B, L, D = q.shape
    return q.new_empty((B, L, D)), q.new_empty((B, 2, L), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, mz, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, mz = output
    ctx.save_for_backward(q, k, v, out, mz)
    ctx.mark_non_differentiable(mz)
    ctx.set_materialize_grads(False)  # no zero [B, 2, L] gradient made for M and Z on the way back
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_mz):
    if grad_out is None:
        return None, None, None, None
    q, k, v, out, mz = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastnl.nl_attention_triton_backward.default(grad_out, q, k, v, out, mz, ctx.scale)
    return dq, dk, dv, None


def _define_ops() -> None:
    if hasattr(torch.ops.fastnl, "nl_attention_triton"):
        return
    define_op_pair("nl_attention_triton", nl_attention_fwd, nl_attention_bwd_op, (_FWD_SCHEMA, _BWD_SCHEMA),
                   (_fake_fwd, _fake_bwd), (_backward, _setup_context))


def nl_attention_bwd_op(grad_out, q, k, v, out, mz, scale: float):
    """:func:`nl_attention_bwd` with grad_out first, as the backward op takes it."""
    return nl_attention_bwd(q, k, v, out, mz, grad_out, scale)


_define_ops()


def nl_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Paper eq. (1) with the Triton kernels: q, k, v [B, L, D], D a multiple of 16 up to 1024,
    float32/float16/bfloat16 (fp32 accumulation). Returns [B, L, D] in q's dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [B, L, D], got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernel, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape [B, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if not triton_head_dim_ok(D):
        raise ValueError(f"q, k, v: head dimension D (last dim) must be a multiple of 16 and at most "
                         f"{MAX_HEAD_DIM} for the Triton kernel, got D={D}; use backend='torch'")
    return torch.ops.fastnl.nl_attention_triton.default(q, k, v, float(scale))[0]
