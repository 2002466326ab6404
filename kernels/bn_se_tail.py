"""The end of an SE-ResNet bottleneck from its last convolution's output on, as Triton kernels:
``relu(x * gate + shortcut)`` with ``x = batch_norm(y)`` (training mode) and ``gate`` the SE
module's excitation of ``mean_hw(x)``, without x ever being written.

y is the last 1x1 convolution's output [N, C, H, W] (contiguous or channels_last, seen as
[N, C, S] with S = H W). Plain PyTorch (cuDNN's BatchNorm, the squeeze's mean, the SE rescale,
the sum and the ReLU, or the extension's one-pass tail op after the first two) writes x, reads
it for the squeeze and again for the tail, and keeps it for the backward. Here:

Forward:

- ``batch_norm._stats_partial`` with ``TILE_SUMS``: the batch statistics of y (as the BatchNorm
  + ReLU op computes them) and, in the same read, each tile's sum of ``y - anchor`` per channel;
  ``batch_norm._stats_finalize`` merges the statistics, and ``_pool_finish`` turns the tile
  sums into the per-image means of the normalised map (``pooled``, [N, C]) and the squeeze
  ``pooled * weight + bias``. One read of y, three launches.
- ``_tail_fwd``: ``out = relu(gate * ((y - mean) * scale + bias) + shortcut)`` in float32,
  rounded once. One read of y and of the shortcut, one write.

Backward (x = xhat * weight + bias, xhat = (y - mean) / std, g = dout where out > 0):

- ``_tail_bwd_partial``: the shortcut's gradient g (written) and per image and channel
  ``sum_hw g``, ``sum_hw g * xhat`` and ``sum_hw g * x`` (the gate's gradient), from which,
  with the squeeze's gradient, the BatchNorm's weight and bias gradients follow on [N, C]
  tensors. One read of dout, out and y, one write.
- ``_tail_bwd_apply``: ``dy = p[n, c] * g + b[c] * (y - mean) + q[n, c]``, the BatchNorm backward of
  ``g * gate + dsqueeze / S`` with its per-channel sums folded into p, q and b. One read of g
  and y, one write.

Against plain PyTorch's passes over a [N, C, H, W] map (forward: BatchNorm 3, the squeeze 1, the
tail 3; backward: the tail 5, the squeeze's gradient 2, BatchNorm's backward 5) this makes 4
forward and 6 backward, and keeps y and out, not y, x and out, for the backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnl._library import define_op
from fastnl.vocabulary import triton_interpreted

from . import batch_norm as bn
from .batch_norm import _centred, _pre_activation, _rounded, _tile_offsets, _tile_position


@triton.jit
def _tail_fwd(X, R, Y, ANCHOR, OFFSET, SCALE, BIAS, GATE, R_ANCHOR, R_OFFSET, R_SCALE, R_BIAS, C, S, NSB,
              sN, sC, sS, rN, rC, rS, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, NORM_R: tl.constexpr,
              INTERPRETED: tl.constexpr):
    """Grid (N * NSB tiles, channel blocks): y = relu(gate[n, c] * ((x - mean) * scale + bias) + r)
    in x's dtype (y has x's strides, the shortcut r its own). NORM_R: the shortcut is the
    BatchNorm of r by its statistics (R_*), ``(r - mean_r) * scale_r + bias_r`` in float32."""
    n, sb = _tile_position(tl.program_id(0), NSB)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    s_base = tl.arange(0, BLOCK_S)
    offs, mask, _s_ok = _tile_offsets(n, sb, c, s_base, sN, sC, sS, C, S, BLOCK_S)
    roffs, _m, _s = _tile_offsets(n, sb, c, s_base, rN, rC, rS, C, S, BLOCK_S)
    anchor = tl.load(ANCHOR + c, mask=keep, other=0.0)
    offset = tl.load(OFFSET + c, mask=keep, other=0.0)
    scale = tl.load(SCALE + c, mask=keep, other=0.0)
    bias = tl.load(BIAS + c, mask=keep, other=0.0)
    gate = tl.load(GATE + n * C + c, mask=keep, other=0.0).to(tl.float32)
    pre = _pre_activation(tl.load(X + offs, mask=mask, other=0.0), anchor, offset, scale, bias)
    r = tl.load(R + roffs, mask=mask, other=0.0)
    if NORM_R:
        r = _pre_activation(r, tl.load(R_ANCHOR + c, mask=keep, other=0.0), tl.load(R_OFFSET + c, mask=keep, other=0.0),
                            tl.load(R_SCALE + c, mask=keep, other=0.0), tl.load(R_BIAS + c, mask=keep, other=0.0))
    v = gate[:, None] * pre + r.to(tl.float32)
    y = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as torch's relu keeps it
    tl.store(Y + offs, _rounded(y, Y.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _tail_bwd_partial(DY, Y, X, DR, ANCHOR, OFFSET, INVSTD, SCALE, BIAS, PSUM, PSUMX, DGATE, R, R_ANCHOR, R_OFFSET,
                      R_INVSTD, PSUMR, C, S, NSB, sN, sC, sS, dN, dC, dS, BLOCK_C: tl.constexpr,
                      BLOCK_S: tl.constexpr, NORM_R: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (N, channel blocks): program n writes g = dy * (y > 0) over image n (DR, x's strides;
    dy has strides dN, dC, dS) and its sums ``sum g`` and ``sum g * xhat`` per channel to row n
    of PSUM and PSUMX [N, C] (float32), and the gate's gradient ``sum g * a`` (a the normalised,
    affine map, as the forward computes it: no cancellation between its weight and bias terms)
    to row n of DGATE [N, C], rounded once to its dtype. NORM_R (the shortcut the BatchNorm of
    R, x's strides): ``sum g * rhat`` to row n of PSUMR too, for that BatchNorm's backward."""
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    anchor = tl.load(ANCHOR + c, mask=keep, other=0.0)
    offset = tl.load(OFFSET + c, mask=keep, other=0.0)
    invstd = tl.load(INVSTD + c, mask=keep, other=0.0)
    scale = tl.load(SCALE + c, mask=keep, other=0.0)
    bias = tl.load(BIAS + c, mask=keep, other=0.0)
    s_base = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_C], dtype=tl.float32)
    if NORM_R:
        r_anchor = tl.load(R_ANCHOR + c, mask=keep, other=0.0)
        r_offset = tl.load(R_OFFSET + c, mask=keep, other=0.0)
        r_invstd = tl.load(R_INVSTD + c, mask=keep, other=0.0)
    for sb in range(0, NSB):
        offs, mask, _s_ok = _tile_offsets(n, sb, c, s_base, sN, sC, sS, C, S, BLOCK_S)
        doffs, _m, _s = _tile_offsets(n, sb, c, s_base, dN, dC, dS, C, S, BLOCK_S)
        out = tl.load(Y + offs, mask=mask, other=0.0)
        dy = tl.load(DY + doffs, mask=mask, other=0.0)
        g = tl.where(out > 0.0, dy, 0.0)  # masked lanes load 0: no contribution
        tl.store(DR + offs, g, mask=mask)
        g32 = g.to(tl.float32)
        centred = _centred(tl.load(X + offs, mask=mask, other=0.0), anchor, offset)
        acc += tl.sum(g32, 1)
        acc_x += tl.sum(g32 * (centred * invstd[:, None]), 1)
        acc_a += tl.sum(g32 * (centred * scale[:, None] + bias[:, None]), 1)
        if NORM_R:
            r_centred = _centred(tl.load(R + offs, mask=mask, other=0.0), r_anchor, r_offset)
            acc_r += tl.sum(g32 * (r_centred * r_invstd[:, None]), 1)
    tl.store(PSUM + n * C + c, acc, mask=keep)
    if NORM_R:
        tl.store(PSUMR + n * C + c, acc_r, mask=keep)
    tl.store(PSUMX + n * C + c, acc_x, mask=keep)
    tl.store(DGATE + n * C + c, _rounded(acc_a, DGATE.dtype.element_ty, INTERPRETED), mask=keep)


@triton.jit
def _tail_bwd_apply(DR, X, DX, ANCHOR, OFFSET, COEF_P, COEF_Q, COEF_B, C, S, NSB, sN, sC, sS,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (N * NSB tiles, channel blocks): dx = p[n, c] * g + b[c] * (x - mean) + q[n, c] in x's
    dtype (g, dx: x's strides)."""
    n, sb = _tile_position(tl.program_id(0), NSB)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    offs, mask, _s_ok = _tile_offsets(n, sb, c, tl.arange(0, BLOCK_S), sN, sC, sS, C, S, BLOCK_S)
    anchor = tl.load(ANCHOR + c, mask=keep, other=0.0)
    offset = tl.load(OFFSET + c, mask=keep, other=0.0)
    coef_b = tl.load(COEF_B + c, mask=keep, other=0.0)
    coef_p = tl.load(COEF_P + n * C + c, mask=keep, other=0.0)
    coef_q = tl.load(COEF_Q + n * C + c, mask=keep, other=0.0)
    g = tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
    centred = _centred(tl.load(X + offs, mask=mask, other=0.0), anchor, offset)
    dx = coef_p[:, None] * g + coef_b[:, None] * centred + coef_q[:, None]
    tl.store(DX + offs, _rounded(dx, DX.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _nc_tile(n, c, keep, N, C):
    """Offsets and mask of rows n, channels c of a contiguous [N, C] tensor."""
    return n[:, None] * C + c[None, :], (n < N)[:, None] & keep[None, :]


@triton.jit
def _coef_rows(GATE, DSQ, n, c, keep, N, C, HAS_GATE: tl.constexpr):
    """Offsets and mask of rows n, channels c of an [N, C] tensor, and the gate and the squeeze's
    gradient there (as float32; 1 and 0 without HAS_GATE)."""
    at, mask = _nc_tile(n, c, keep, N, C)
    if HAS_GATE:
        return (at, mask, tl.load(GATE + at, mask=mask, other=0.0).to(tl.float32),
                tl.load(DSQ + at, mask=mask, other=0.0).to(tl.float32))
    return at, mask, tl.where(mask, 1.0, 0.0), tl.zeros(mask.shape, dtype=tl.float32)


@triton.jit
def _bwd_coefs(GATE, SUMS, SUMSX, DSQ, POOLED, INVSTD, SCALE, COEF_P, COEF_Q, COEF_B, DW, DB, N, C, positions,
               count, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_GATE: tl.constexpr):
    """Grid (channel blocks,): from the gate, the [N, C] sums ``sum g`` (SUMS) and ``sum g xhat``
    (SUMSX) of ``_tail_bwd_partial``, the squeeze's gradient and the per-image means of xhat (all
    [N, C], float32 but the gate and DSQ), the BatchNorm's ``db = sum_n gate * sum g + dsq`` and
    ``dw = sum_n gate * sum g xhat + dsq * pooled`` per channel, then ``_tail_bwd_apply``'s
    coefficients ``p = scale * gate``, ``q = scale * (dsq / positions - db / count)`` ([N, C])
    and ``b = -scale * invstd * dw / count`` ([C]): what would otherwise be some twenty small
    torch ops on [N, C]. Without HAS_GATE (a BatchNorm whose output is summed as it is, the
    shortcut's) the gate is 1 and dsq 0: GATE, DSQ and POOLED are not read."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    rows = tl.arange(0, BLOCK_N)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        at, mask, gate, dsq = _coef_rows(GATE, DSQ, n0 + rows, c, keep, N, C, HAS_GATE)
        db += tl.sum(gate * tl.load(SUMS + at, mask=mask, other=0.0) + dsq, 0)
        gx = gate * tl.load(SUMSX + at, mask=mask, other=0.0)
        if HAS_GATE:
            gx += dsq * tl.load(POOLED + at, mask=mask, other=0.0)
        dw += tl.sum(gx, 0)
    invstd = tl.load(INVSTD + c, mask=keep, other=0.0)
    scale = tl.load(SCALE + c, mask=keep, other=0.0)
    tl.store(DB + c, db, mask=keep)
    tl.store(DW + c, dw, mask=keep)
    tl.store(COEF_B + c, -scale * invstd * (dw / count), mask=keep)
    shift = db / count
    for n0 in range(0, N, BLOCK_N):
        at, mask, gate, dsq = _coef_rows(GATE, DSQ, n0 + rows, c, keep, N, C, HAS_GATE)
        tl.store(COEF_P + at, scale[None, :] * gate, mask=mask)
        tl.store(COEF_Q + at, scale[None, :] * (dsq / positions - shift[None, :]), mask=mask)


@triton.jit
def _pool_finish(TSUM, OFFSET, INVSTD, W, BIAS, POOLED, SQUEEZE, N, C, NSB, positions,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (image blocks, channel blocks): from the [N * NSB, C] tile sums of ``y - anchor`` that
    ``batch_norm._stats_partial`` wrote, the per-image means of xhat ``pooled = (sum_sb tsum -
    S offset) * (invstd / S)`` (float32 [N, C]) and the squeeze ``bias + pooled * weight``, rounded
    once to SQUEEZE's dtype: what would otherwise be six small torch ops on [N, C]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    at, mask = _nc_tile(n, c, keep, N, C)
    rows = n[:, None].to(tl.int64) * NSB * C + c[None, :]  # tile (n, 0) of the image's NSB
    total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for sb in range(0, NSB):
        total += tl.load(TSUM + rows + sb * C, mask=mask, other=0.0)
    offset = tl.load(OFFSET + c, mask=keep, other=0.0)
    invstd = tl.load(INVSTD + c, mask=keep, other=0.0)
    weight = tl.load(W + c, mask=keep, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + c, mask=keep, other=0.0)
    pooled = (total - positions * offset[None, :]) * (invstd / positions)[None, :]
    tl.store(POOLED + at, pooled, mask=mask)
    squeeze = bias[None, :] + pooled * weight[None, :]
    tl.store(SQUEEZE + at, _rounded(squeeze, SQUEEZE.dtype.element_ty, INTERPRETED), mask=mask)


KERNELS = {"se_tail_fwd": _tail_fwd, "se_tail_bwd_partial": _tail_bwd_partial, "se_tail_bwd_apply": _tail_bwd_apply,
           "se_tail_bwd_coefs": _bwd_coefs, "bn_pool_finish": _pool_finish}


# --------------------------------------------------------------------------------------------
# The ops (torch.library custom ops: opaque to torch.compile, fake kernels for the shape-only
# counts). Autograd is :mod:`fastnl.model.bn_se_tail`'s, which spans the SE module.
# --------------------------------------------------------------------------------------------


POOL_BLOCKS = (16, 32)  # (BLOCK_N, BLOCK_C) of ``_pool_finish``: rows of 128 bytes


def bn_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(stats, pooled, squeeze): the batch statistics of x as ``batch_norm.bn_relu_fwd`` returns
    them ([STATS, C] float32), the per-image mean of the normalised ``xhat = (x - mean) / std``
    ([N, C] float32) and the squeeze ``mean_hw(xhat * weight + bias)`` ([N, C] in x's dtype), in
    one read of x and three launches."""
    N, C = x.shape[:2]
    pooled = torch.empty((N, C), device=x.device, dtype=torch.float32)
    squeeze = torch.empty((N, C), device=x.device, dtype=x.dtype)
    if not bn._launches(x):
        return bn.batch_stats(x, weight, bias, eps), pooled, squeeze
    N, C, S, block_c, block_s, nsb, cb, tiles = bn._geometry(x)
    tile_sums = torch.empty((tiles, C), device=x.device, dtype=torch.float32)
    stats = bn.batch_stats(x, weight, bias, eps, tile_sums)
    block_n, block_c = POOL_BLOCKS
    _pool_finish[(triton.cdiv(N, block_n), triton.cdiv(C, block_c))](
        tile_sums, stats[6], stats[1], weight, stats[4], pooled, squeeze, N, C, nsb, float(S),
        BLOCK_N=block_n, BLOCK_C=block_c, INTERPRETED=triton_interpreted(), num_warps=4)
    return stats, pooled, squeeze


def tail_fwd(x: torch.Tensor, stats: torch.Tensor, gate: torch.Tensor, shortcut: torch.Tensor,
             shortcut_stats: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(gate * batch_norm(x) + shortcut)`` (gate contiguous [N, C], any float dtype, read as
    float32; the BatchNorm from ``stats``) in x's dtype and layout. With ``shortcut_stats`` (as
    :func:`fastnl.kernels.batch_norm.batch_stats` returns them) the shortcut added is the
    BatchNorm of ``shortcut`` by them, never written."""
    y = torch.empty_like(x)
    if not bn._launches(x):
        return y
    N, C, S, block_c, block_s, nsb, cb, tiles = bn._geometry(x)
    r = stats if shortcut_stats is None else shortcut_stats  # (unread without NORM_R)
    _tail_fwd[(tiles, cb)](x, shortcut, y, stats[5], stats[6], stats[3], stats[4], gate, r[5], r[6], r[3], r[4],
                           C, S, nsb, *bn._strides(x), *bn._strides(shortcut), BLOCK_C=block_c, BLOCK_S=block_s,
                           NORM_R=shortcut_stats is not None, INTERPRETED=triton_interpreted(), num_warps=4)
    return y


# warps of ``_tail_bwd_partial`` with a normalised shortcut: a fourth map read per element; with
# 4 warps its 16 elements per thread took 158 registers (sm_90, positions contiguous), 8 take 128
NORM_R_PARTIAL_WARPS = 8


def tail_bwd_partial(grad_y: torch.Tensor, y: torch.Tensor, x: torch.Tensor, stats: torch.Tensor,
                     gate_dtype: torch.dtype, shortcut: torch.Tensor | None = None,
                     shortcut_stats: torch.Tensor | None = None):
    """(g, sums, dgate): g = grad_y where y > 0 (the shortcut's gradient, in x's layout and
    grad_y's dtype), sums [2, N, C] float32: per image and channel ``sum g`` and ``sum g * xhat``,
    and the gate's gradient ``sum g * batch_norm(x)`` [N, C] in ``gate_dtype``. With the
    pre-BatchNorm ``shortcut`` (x's strides) and its ``shortcut_stats`` (:func:`tail_fwd`), sums
    is [3, N, C], its row 2 ``sum g * shortcut_hat``."""
    norm = shortcut_stats is not None
    if norm and (shortcut is None or shortcut.stride() != x.stride()):
        raise ValueError("tail_bwd_partial: a normalised shortcut must be given with x's strides")
    g = torch.empty_like(x, dtype=grad_y.dtype)
    sums = torch.empty((3 if norm else 2, x.shape[0], x.shape[1]), device=x.device, dtype=torch.float32)
    dgate = torch.empty((x.shape[0], x.shape[1]), device=x.device, dtype=gate_dtype)
    if not bn._launches(x):
        return g, sums, dgate
    N, C, S, block_c, block_s, nsb, cb, tiles = bn._geometry(x)
    r, r_stats, r_sums = (shortcut, shortcut_stats, sums[2]) if norm else (x, stats, sums[0])  # unread without NORM_R
    _tail_bwd_partial[(N, cb)](grad_y, y, x, g, stats[5], stats[6], stats[1], stats[3], stats[4], sums[0], sums[1],
                               dgate, r, r_stats[5], r_stats[6], r_stats[1], r_sums, C, S, nsb, *bn._strides(x),
                               *bn._strides(grad_y), BLOCK_C=block_c, BLOCK_S=block_s, NORM_R=norm,
                               INTERPRETED=triton_interpreted(), num_warps=NORM_R_PARTIAL_WARPS if norm else 4)
    return g, sums, dgate


COEF_BLOCKS = (32, 32)  # (BLOCK_N, BLOCK_C) of ``_bwd_coefs``: rows of 128 bytes, 32 images a step


def tail_bwd_coefs(gate: torch.Tensor | None, sums: torch.Tensor, dsq: torch.Tensor | None,
                   pooled: torch.Tensor | None, stats: torch.Tensor, positions: int, row: int = 1):
    """(coef_p, coef_q, coef_b, dweight, dbias), float32: the BatchNorm backward's coefficients
    for :func:`tail_bwd_apply` and the affine gradients, from the gate [N, C] (any float dtype),
    the sums of :func:`tail_bwd_partial` (row 0 ``sum g``, row ``row`` ``sum g * xhat``), the
    squeeze's gradient dsq [N, C] (any float dtype), the per-image means of xhat [N, C] and the
    forward's stats; ``positions`` = H W. Gate, dsq and pooled None (the shortcut's BatchNorm,
    ``row`` 2): a gate of 1 and no squeeze."""
    N, C = sums.shape[1:]
    coef_p, coef_q = (sums.new_empty((N, C)) for _ in range(2))
    coef_b, dweight, dbias = (sums.new_empty(C) for _ in range(3))
    if not bn._launches(sums):
        return coef_p, coef_q, coef_b, dweight, dbias
    has_gate = gate is not None
    if has_gate != (dsq is not None) or has_gate != (pooled is not None):
        raise ValueError("tail_bwd_coefs: gate, dsq and pooled are given together or not at all")
    block_n, block_c = COEF_BLOCKS
    _bwd_coefs[(triton.cdiv(C, block_c),)](*((gate,) if has_gate else (sums,)), sums[0], sums[row],
                                           *((dsq, pooled) if has_gate else (sums, sums)), stats[1], stats[3],
                                           coef_p, coef_q, coef_b, dweight, dbias, N, C, float(positions),
                                           float(N * positions), BLOCK_N=block_n, BLOCK_C=block_c,
                                           HAS_GATE=has_gate, num_warps=4)
    return coef_p, coef_q, coef_b, dweight, dbias


def tail_bwd_apply(g: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, coef_p: torch.Tensor,
                   coef_q: torch.Tensor, coef_b: torch.Tensor) -> torch.Tensor:
    """dx = coef_p * g + coef_b * (x - mean) + coef_q (coef_p, coef_q [N, C], coef_b [C], float32)
    in x's dtype and layout."""
    dx = torch.empty_like(x)
    if not bn._launches(x):
        return dx
    N, C, S, block_c, block_s, nsb, cb, tiles = bn._geometry(x)
    _tail_bwd_apply[(tiles, cb)](g, x, dx, stats[5], stats[6], coef_p, coef_q, coef_b, C, S, nsb, *bn._strides(x),
                                 BLOCK_C=block_c, BLOCK_S=block_s, INTERPRETED=triton_interpreted(),
                                 num_warps=4)
    return dx


def _fake_bn_pool(x, weight, bias, eps):
    return (x.new_empty((bn.STATS, x.shape[1]), dtype=torch.float32), x.new_empty(x.shape[:2], dtype=torch.float32),
            x.new_empty(x.shape[:2]))


def _fake_tail_fwd(x, stats, gate, shortcut, shortcut_stats=None):
    return torch.empty_like(x)


def _fake_tail_bwd_partial(grad_y, y, x, stats, gate_dtype, shortcut=None, shortcut_stats=None):
    rows = 2 if shortcut_stats is None else 3
    return (torch.empty_like(x, dtype=grad_y.dtype), x.new_empty((rows, *x.shape[:2]), dtype=torch.float32),
            x.new_empty(x.shape[:2], dtype=gate_dtype))


def _fake_tail_bwd_apply(g, x, stats, coef_p, coef_q, coef_b):
    return torch.empty_like(x)


def _fake_tail_bwd_coefs(gate, sums, dsq, pooled, stats, positions, row=1):
    N, C = sums.shape[1:]
    return (*(sums.new_empty((N, C)) for _ in range(2)), *(sums.new_empty(C) for _ in range(3)))


def _fake_bn_stats(x, weight, bias, eps):
    return x.new_empty((bn.STATS, x.shape[1]), dtype=torch.float32)


_OPS = {
    "bn_pool": (bn_pool, "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)",
                _fake_bn_pool),
    "bn_stats": (bn.batch_stats, "(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor", _fake_bn_stats),
    "se_tail": (tail_fwd, "(Tensor x, Tensor stats, Tensor gate, Tensor shortcut, Tensor? shortcut_stats=None) "
                          "-> Tensor", _fake_tail_fwd),
    "se_tail_bwd_partial": (tail_bwd_partial, "(Tensor grad_y, Tensor y, Tensor x, Tensor stats, ScalarType gate_dtype, "
                            "Tensor? shortcut=None, Tensor? shortcut_stats=None) -> (Tensor, Tensor, Tensor)",
                            _fake_tail_bwd_partial),
    "se_tail_bwd_apply": (tail_bwd_apply, "(Tensor g, Tensor x, Tensor stats, Tensor coef_p, Tensor coef_q, "
                                          "Tensor coef_b) -> Tensor", _fake_tail_bwd_apply),
    "se_tail_bwd_coefs": (tail_bwd_coefs, "(Tensor? gate, Tensor sums, Tensor? dsq, Tensor? pooled, Tensor stats, "
                                          "int positions, int row=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                          _fake_tail_bwd_coefs),
}

for _name, (_fn, _schema, _fake) in _OPS.items():
    if not hasattr(torch.ops.fastnl, _name):
        define_op(_name, _fn, _schema, _fake)
