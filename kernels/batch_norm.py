"""BatchNorm with batch statistics (training mode) and the ReLU after it, as Triton kernels:
``relu(batch_norm(x))`` after the stem's convolution and each SE-ResNet bottleneck's first two,
in one op.

x is [N, C, H, W], contiguous or channels_last, seen as [N, C, S] (S = H W) with its strides.
Forward, three kernels (plain PyTorch: cuDNN's BatchNorm, then a ReLU that reads and writes
the map once more):

- ``_stats_partial``: each program merges the mean and the sum of squared deviations (M2) of
  the tiles it reads into per-channel partials (Chan et al.'s parallel update: a tile's own
  mean and M2 first, so a channel whose mean is large against its spread loses nothing to
  cancellation). One read of x.
- ``_stats_finalize``: per channel, the partials merged; the mean, 1 / sqrt(var + eps), the
  unbiased variance (for the running statistics) and the affine ``scale = weight / std``.
- ``_relu_apply``: ``y = relu((x - mean) * scale + bias)``, rounded once to x's dtype. One read
  of x, one write.

Backward, three kernels (plain: the ReLU's backward reads the gradient and y and writes, then
cuDNN's BatchNorm backward reads both its inputs twice and writes):

- ``_bwd_partial``: per channel, ``sum(g)`` and ``sum(g * xhat)`` with g the output gradient
  where the forward's y is positive (the mask recomputed from x with the forward's expression
  and its rounding to x's dtype, so it is exactly ``y > 0``). One read of the
  gradient and of x.
- ``_bwd_finalize``: per channel, the weight's and the bias's gradients and the coefficients of
  ``dx = scale * g + b * (x - mean) + c``.
- ``_bwd_apply``: dx. One read of the gradient and of x, one write.

The kernels hold the mean as the mean of a sample of each channel (its first position block in
the first images: the anchor) plus the mean of ``x - anchor``: ``x - mean`` then keeps its
digits where the mean is large against the spread, as plain PyTorch's double-accumulated CPU
BatchNorm does.

Everything is computed in float32 (the statistics and the affine terms are float32 [C]); no
atomics, so the result is deterministic. Under ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors; on fake tensors (``FakeTensorMode``) the ops allocate their outputs and launch nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnl._library import define_op_pair
from fastnl.vocabulary import triton_interpreted

TILE = 2048  # elements of one program's tile (4 warps: 16 per thread)
MAX_BLOCK_C = 128  # channels of a tile where channels are the contiguous dimension
MAX_BLOCK_S = 512  # positions of a tile where positions are contiguous
PROGRAMS_PER_SM = 8  # reduction programs (all channel blocks together) per multiprocessor: 32 warps
STATS = 7  # rows of the forward's per-channel statistics
ANCHOR_SAMPLES = 32  # positions of each channel (from the first images' first position block) in its anchor
MAX_PARTIALS = 1024  # reduction programs per channel block at most (the finalize reads them at once)
FINALIZE_TILE = 2048  # elements of a finalize program's [partials, channels] tile


@triton.jit
def _tile_offsets(n, sb, c, s_base, sN, sC, sS, C, S, BLOCK_S: tl.constexpr):
    """Offsets and mask of the [BLOCK_C, BLOCK_S] tile of image n, position block sb, channels c:
    the image's offset (int64, one per tile) plus offsets within the image (int32: one image's
    C H W elements), which keeps the per-element address arithmetic in 32 bits."""
    s = sb * BLOCK_S + s_base
    mask = (c < C)[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * sN + (c[:, None] * sC + s[None, :] * sS)
    return offs, mask, (s < S)


@triton.jit
def _centred(x, anchor, offset):
    """``x - mean`` in float32 with the mean held as ``anchor + offset``: anchor the mean of a
    sample of the channel (a few spreads / sqrt(sample) from the mean), offset the mean of
    ``x - anchor``. Both roundings are then relative to the spread, not to the mean: a mean that
    is large against the spread costs no digits of ``x - mean`` (a float32 mean alone is off by
    up to half its ulp, all of which ``x - mean`` keeps)."""
    return (x.to(tl.float32) - anchor[:, None]) - offset[:, None]


@triton.jit
def _tile_position(t, NSB):
    """(image, position block) of tile t, NSB position blocks per image."""
    n = t // NSB
    return n, t - n * NSB


@triton.jit
def _pre_activation(x, anchor, offset, scale, bias):
    """The normalised, affine map before the ReLU, ``(x - mean) * scale + bias`` in float32 (every
    kernel computes it so). Centred first: ``x * scale + (bias - mean * scale)`` would round
    ``x * scale``, which cancels against the shift where the mean is large against the spread."""
    return _centred(x, anchor, offset) * scale[:, None] + bias[:, None]


@triton.jit
def _rounded(v, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 ``v`` rounded to nearest (even) in DTYPE, as a GPU's conversion does. Triton's
    interpreter truncates float32 to bfloat16 (it drops the low bits): there the rounding is
    done on the bits."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def _stats_partial(X, ANCHOR, PCNT, PMEAN, PM2, TSUM, C, S, T, NSB, G, K, sN, sC, sS,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TILE_SUMS: tl.constexpr):
    """Grid (G, channel blocks): program g merges tiles g, g + G, ... (T tiles per channel block,
    NSB position blocks per image) into count, mean and M2 of ``x - anchor`` per channel at row
    g of [G, C]. The anchor, the mean of the channels' first position block in the first K
    images, every program computes alike (the same bits); program 0 writes it to ANCHOR. With
    TILE_SUMS, each tile's sum of ``x - anchor`` per channel goes to row t of TSUM [T, C] too."""
    g = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s_base = tl.arange(0, BLOCK_S)
    first = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n in range(0, K):
        offs, mask, _s_ok = _tile_offsets(g * 0 + n, 0, c, s_base, sN, sC, sS, C, S, BLOCK_S)
        first += tl.sum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), 1)
    anchor = first / (K * tl.sum((s_base < S).to(tl.float32), 0))
    if g == 0:
        tl.store(ANCHOR + c, anchor, mask=c < C)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    keep = c < C
    for t in range(g, T, G):
        n, sb = _tile_position(t, NSB)
        offs, mask, s_ok = _tile_offsets(n, sb, c, s_base, sN, sC, sS, C, S, BLOCK_S)
        x = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - anchor[:, None], 0.0)
        tcnt = tl.sum(s_ok.to(tl.float32), 0)
        tsum = tl.sum(x, 1)
        if TILE_SUMS:
            tl.store(TSUM + t * C + c, tsum, mask=keep)
        tmean = tsum / tcnt
        d = tl.where(mask, x - tmean[:, None], 0.0)
        tm2 = tl.sum(d * d, 1)
        total = cnt + tcnt
        delta = tmean - mean
        mean = mean + delta * (tcnt / total)
        m2 = m2 + tm2 + delta * delta * (cnt * (tcnt / total))
        cnt = total
    tl.store(PCNT + g * C + c, cnt, mask=keep)
    tl.store(PMEAN + g * C + c, mean, mask=keep)
    tl.store(PM2 + g * C + c, m2, mask=keep)


@triton.jit
def _stats_finalize(PCNT, PMEAN, PM2, W, B, MEAN, INVSTD, VAR, SCALE, BIAS, ANCHOR, OFFSET, C, G, eps,
                    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (channel blocks,): the G <= BLOCK_G partials of each channel merged at once (count
    ``sum n_g``, mean ``sum n_g m_g / n``, M2 ``sum M2_g + sum n_g (m_g - mean)^2``); writes the
    mean, 1/std, the unbiased variance, the affine scale (weight / std), the bias, the anchor and
    the mean less the anchor (the anchor written by ``_stats_partial``), all float32 [C]."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    rows = tl.arange(0, BLOCK_G)
    mask = (rows < G)[:, None] & keep[None, :]
    at = rows[:, None] * C + c[None, :]
    part_cnt = tl.load(PCNT + at, mask=mask, other=0.0)
    part_mean = tl.load(PMEAN + at, mask=mask, other=0.0)
    cnt = tl.where(keep, tl.sum(part_cnt, 0), 2.0)  # lanes past C: any count above 1
    mean = tl.sum(part_cnt * part_mean, 0) / cnt
    spread = tl.where(mask, part_mean - mean[None, :], 0.0)
    m2 = tl.sum(tl.load(PM2 + at, mask=mask, other=0.0), 0) + tl.sum(part_cnt * spread * spread, 0)
    var = m2 / cnt
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(W + c, mask=keep, other=1.0).to(tl.float32)
    b = tl.load(B + c, mask=keep, other=0.0).to(tl.float32)
    scale = w * invstd
    anchor = tl.load(ANCHOR + c, mask=keep, other=0.0)
    tl.store(MEAN + c, anchor + mean, mask=keep)
    tl.store(OFFSET + c, mean, mask=keep)
    tl.store(INVSTD + c, invstd, mask=keep)
    tl.store(VAR + c, m2 / (cnt - 1.0), mask=keep)
    tl.store(SCALE + c, scale, mask=keep)
    tl.store(BIAS + c, b, mask=keep)


@triton.jit
def _relu_apply(X, Y, ANCHOR, OFFSET, SCALE, BIAS, C, S, NSB, sN, sC, sS, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """Grid (N * NSB tiles, channel blocks): y = relu((x - mean) * scale + bias) in x's dtype (y has x's
    strides)."""
    n, sb = _tile_position(tl.program_id(0), NSB)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask, _s_ok = _tile_offsets(n, sb, c, tl.arange(0, BLOCK_S), sN, sC, sS, C, S, BLOCK_S)
    anchor = tl.load(ANCHOR + c, mask=c < C, other=0.0)
    offset = tl.load(OFFSET + c, mask=c < C, other=0.0)
    scale = tl.load(SCALE + c, mask=c < C, other=0.0)
    bias = tl.load(BIAS + c, mask=c < C, other=0.0)
    pre = _pre_activation(tl.load(X + offs, mask=mask, other=0.0), anchor, offset, scale, bias)
    y = tl.where(pre < 0.0, 0.0, pre)  # NaN stays NaN, as torch's relu keeps it
    tl.store(Y + offs, _rounded(y, Y.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _bwd_partial(DY, X, ANCHOR, OFFSET, SCALE, BIAS, INVSTD, PSUM, PSUMX, C, S, T, NSB, G, sN, sC, sS, dN, dC, dS,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (G, channel blocks): program g sums g = dy * (y > 0) and g * xhat over tiles
    g, g + G, ... per channel into row g of PSUM and PSUMX [G, C] (dy has strides dN, dC, dS)."""
    g = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    anchor = tl.load(ANCHOR + c, mask=keep, other=0.0)
    offset = tl.load(OFFSET + c, mask=keep, other=0.0)
    scale = tl.load(SCALE + c, mask=keep, other=0.0)
    bias = tl.load(BIAS + c, mask=keep, other=0.0)
    invstd = tl.load(INVSTD + c, mask=keep, other=0.0)
    s_base = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(g, T, G):
        n, sb = _tile_position(t, NSB)
        offs, mask, _s_ok = _tile_offsets(n, sb, c, s_base, sN, sC, sS, C, S, BLOCK_S)
        doffs, _m, _s = _tile_offsets(n, sb, c, s_base, dN, dC, dS, C, S, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0)
        dy = tl.load(DY + doffs, mask=mask, other=0.0).to(tl.float32)
        centred = _centred(x, anchor, offset)
        passed = _rounded(centred * scale[:, None] + bias[:, None], X.dtype.element_ty, INTERPRETED) > 0.0
        grad = tl.where(passed & mask, dy, 0.0)
        acc += tl.sum(grad, 1)
        acc_x += tl.sum(grad * (centred * invstd[:, None]), 1)
    tl.store(PSUM + g * C + c, acc, mask=keep)
    tl.store(PSUMX + g * C + c, acc_x, mask=keep)


@triton.jit
def _bwd_finalize(PSUM, PSUMX, SCALE, INVSTD, DW, DB, COEF_B, COEF_C, C, G, count,
                  BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (channel blocks,): the G <= BLOCK_G partial sums of each channel added at once;
    dbias = sum(g), dweight = sum(g * xhat) (in DW's and DB's dtype), and the coefficients of
    dx = scale * g + b * (x - mean) + c (float32 [C])."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    rows = tl.arange(0, BLOCK_G)
    mask = (rows < G)[:, None] & keep[None, :]
    at = rows[:, None] * C + c[None, :]
    total = tl.sum(tl.load(PSUM + at, mask=mask, other=0.0), 0)
    total_x = tl.sum(tl.load(PSUMX + at, mask=mask, other=0.0), 0)
    scale = tl.load(SCALE + c, mask=keep, other=0.0)
    invstd = tl.load(INVSTD + c, mask=keep, other=0.0)
    tl.store(DB + c, _rounded(total, DB.dtype.element_ty, INTERPRETED), mask=keep)
    tl.store(DW + c, _rounded(total_x, DW.dtype.element_ty, INTERPRETED), mask=keep)
    tl.store(COEF_B + c, -scale * invstd * (total_x / count), mask=keep)
    tl.store(COEF_C + c, -scale * (total / count), mask=keep)


@triton.jit
def _bwd_apply(DY, X, DX, ANCHOR, OFFSET, SCALE, BIAS, COEF_B, COEF_C, C, S, NSB, sN, sC, sS, dN, dC, dS,
               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (N * NSB tiles, channel blocks): dx = scale * dy * (y > 0) + b * (x - mean) + c in x's
    dtype (dx has x's strides, dy its own)."""
    n, sb = _tile_position(tl.program_id(0), NSB)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    s_base = tl.arange(0, BLOCK_S)
    offs, mask, _s_ok = _tile_offsets(n, sb, c, s_base, sN, sC, sS, C, S, BLOCK_S)
    doffs, _m, _s = _tile_offsets(n, sb, c, s_base, dN, dC, dS, C, S, BLOCK_S)
    anchor = tl.load(ANCHOR + c, mask=keep, other=0.0)
    offset = tl.load(OFFSET + c, mask=keep, other=0.0)
    scale = tl.load(SCALE + c, mask=keep, other=0.0)
    bias = tl.load(BIAS + c, mask=keep, other=0.0)
    coef_b = tl.load(COEF_B + c, mask=keep, other=0.0)
    coef_c = tl.load(COEF_C + c, mask=keep, other=0.0)
    x = tl.load(X + offs, mask=mask, other=0.0)
    dy = tl.load(DY + doffs, mask=mask, other=0.0).to(tl.float32)
    centred = _centred(x, anchor, offset)
    passed = _rounded(centred * scale[:, None] + bias[:, None], X.dtype.element_ty, INTERPRETED) > 0.0
    grad = tl.where(passed, dy, 0.0)
    dx = scale[:, None] * grad + coef_b[:, None] * centred + coef_c[:, None]
    tl.store(DX + offs, _rounded(dx, DX.dtype.element_ty, INTERPRETED), mask=mask)


KERNELS = {"bn_stats_partial": _stats_partial, "bn_stats_finalize": _stats_finalize, "bn_relu_apply": _relu_apply,
           "bn_relu_bwd_partial": _bwd_partial, "bn_relu_bwd_finalize": _bwd_finalize,
           "bn_relu_bwd_apply": _bwd_apply}


# --------------------------------------------------------------------------------------------
# Launch geometry
# --------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, channel, position) strides of a [N, C, H, W] tensor whose H W positions form one
    dimension of stride ``stride(3)`` (contiguous or channels_last)."""
    return t.stride(0), t.stride(1), t.stride(3)


def dense_layout(t: torch.Tensor) -> bool:
    """Whether [N, C, H, W] ``t`` is contiguous or channels_last (positions one strided dimension)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def blocks(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of the tiles: the contiguous dimension long, the other filling TILE."""
    C, S = x.shape[1], x.shape[2] * x.shape[3]
    c_pow, s_pow = triton.next_power_of_2(C), triton.next_power_of_2(S)
    if x.stride(1) == 1 and C > 1:  # channels_last: channels contiguous
        block_c = min(MAX_BLOCK_C, c_pow)
        return block_c, min(s_pow, max(1, TILE // block_c))
    block_s = min(MAX_BLOCK_S, s_pow)
    return min(c_pow, max(1, TILE // block_s)), block_s


_SM_COUNT: dict = {}


def reduction_programs(sm_count: int, channel_blocks: int, tiles: int) -> int:
    """G, the reduction programs per channel block: about PROGRAMS_PER_SM per multiprocessor in
    all, at most MAX_PARTIALS, never more than the tiles (each program reads at least one)."""
    return max(1, min(tiles, MAX_PARTIALS, -(-PROGRAMS_PER_SM * sm_count // channel_blocks)))


def _reduction_programs(x: torch.Tensor, channel_blocks: int, tiles: int) -> int:
    if not x.is_cuda:  # the interpreter: few programs
        return max(1, min(tiles, 4))
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return reduction_programs(_SM_COUNT[index], channel_blocks, tiles)


def finalize_blocks(C: int, G: int) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_C) of the finalize kernels: all G partials in one tile of at most
    FINALIZE_TILE elements."""
    block_g = triton.next_power_of_2(G)
    return block_g, max(1, min(triton.next_power_of_2(C), FINALIZE_TILE // block_g))


def anchor_images(N: int, S: int, block_s: int) -> int:
    """K, the images whose first position block (min(S, BLOCK_S) positions) gives each
    channel's anchor: enough for ANCHOR_SAMPLES positions, one where a block holds that many."""
    return min(N, -(-ANCHOR_SAMPLES // min(S, block_s)))


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the first takes 2^31 - 1)


def _geometry(x: torch.Tensor):
    N, C, H, W = x.shape
    S = H * W
    block_c, block_s = blocks(x)
    nsb = triton.cdiv(S, block_s)
    cb = triton.cdiv(C, block_c)
    tiles = N * nsb  # grid dimension 0 of the apply kernels; the channel blocks are dimension 1
    if cb > MAX_GRID_Y:
        raise ValueError(f"{C} channels make {cb} channel blocks, more than a CUDA grid holds ({MAX_GRID_Y})")
    return N, C, S, block_c, block_s, nsb, cb, tiles


# --------------------------------------------------------------------------------------------
# The two ops
# --------------------------------------------------------------------------------------------


def _launches(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[1], device=x.device, dtype=torch.float32)


def batch_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                tile_sums: torch.Tensor | None = None) -> torch.Tensor:
    """stats [STATS, C] float32 of x's batch (mean, 1/std, unbiased variance, scale (weight /
    std), bias, anchor, mean less the anchor) in one read of x and two launches; with
    ``tile_sums`` ([tiles, C] float32) each tile's sum of ``x - anchor`` per channel too."""
    stats = torch.empty((STATS, x.shape[1]), device=x.device, dtype=torch.float32)
    if not _launches(x):
        return stats
    N, C, S, block_c, block_s, nsb, cb, tiles = _geometry(x)
    G = _reduction_programs(x, cb, tiles)
    partial = torch.empty((3, G, C), device=x.device, dtype=torch.float32)
    _stats_partial[(G, cb)](x, stats[5], partial[0], partial[1], partial[2],
                            partial[0] if tile_sums is None else tile_sums, C, S, tiles, nsb, G,
                            anchor_images(N, S, block_s), *_strides(x),
                            BLOCK_C=block_c, BLOCK_S=block_s, TILE_SUMS=tile_sums is not None, num_warps=4)
    fin_g, fin_c = finalize_blocks(C, G)
    _stats_finalize[(triton.cdiv(C, fin_c),)](partial[0], partial[1], partial[2], weight, bias, *stats, C, G,
                                              float(eps), BLOCK_G=fin_g, BLOCK_C=fin_c, num_warps=4)
    return stats


def bn_relu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(y, stats): y = relu(batch_norm(x)) with x's batch statistics, in x's dtype and layout;
    stats as :func:`batch_stats` returns them."""
    y = torch.empty_like(x)
    stats = batch_stats(x, weight, bias, eps)
    if not _launches(x):
        return y, stats
    N, C, S, block_c, block_s, nsb, cb, tiles = _geometry(x)
    _relu_apply[(tiles, cb)](x, y, stats[5], stats[6], stats[3], stats[4], C, S, nsb, *_strides(x),
                             BLOCK_C=block_c, BLOCK_S=block_s, INTERPRETED=triton_interpreted(), num_warps=4)
    return y, stats


def bn_relu_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor):
    """(dx, dweight, dbias) of :func:`bn_relu_fwd` from the output gradient, x, the weight and the
    forward's stats; dx in x's dtype and layout, dweight and dbias in the weight's dtype."""
    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    if not _launches(x):
        return dx, dweight, dbias
    if not dense_layout(grad_y):
        grad_y = grad_y.contiguous()
    N, C, S, block_c, block_s, nsb, cb, tiles = _geometry(x)
    G = _reduction_programs(x, cb, tiles)
    partial = torch.empty((2, G, C), device=x.device, dtype=torch.float32)
    coef = torch.empty((2, C), device=x.device, dtype=torch.float32)
    invstd, scale, bias32, anchor, offset = stats[1], stats[3], stats[4], stats[5], stats[6]
    sN, sC, sS = _strides(x)
    dN, dC, dS = _strides(grad_y)
    _bwd_partial[(G, cb)](grad_y, x, anchor, offset, scale, bias32, invstd, partial[0], partial[1], C, S, tiles, nsb, G,
                          sN, sC, sS, dN, dC, dS, BLOCK_C=block_c, BLOCK_S=block_s,
                          INTERPRETED=triton_interpreted(), num_warps=4)
    fin_g, fin_c = finalize_blocks(C, G)
    _bwd_finalize[(triton.cdiv(C, fin_c),)](partial[0], partial[1], scale, invstd, dweight, dbias, coef[0],
                                            coef[1], C, G, float(N * S), BLOCK_G=fin_g, BLOCK_C=fin_c,
                                            INTERPRETED=triton_interpreted(), num_warps=4)
    _bwd_apply[(tiles, cb)](grad_y, x, dx, anchor, offset, scale, bias32, coef[0], coef[1], C, S, nsb, sN, sC, sS,
                            dN, dC, dS, BLOCK_C=block_c, BLOCK_S=block_s, INTERPRETED=triton_interpreted(),
                            num_warps=4)
    return dx, dweight, dbias


# torch.library custom ops, as for the attention kernels (opaque to torch.compile, fake kernels
# for the shape-only counts of ``fastnl bench memory`` and ``step-cost``). The running
# statistics are updated by the caller from the returned stats: a custom op with an autograd
# formula cannot mutate its inputs.

_FWD_SCHEMA = "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)"
_BWD_SCHEMA = "(Tensor grad_y, Tensor x, Tensor weight, Tensor stats) -> (Tensor, Tensor, Tensor)"


def _fake_fwd(x, weight, bias, eps):
    return torch.empty_like(x), x.new_empty((STATS, x.shape[1]), dtype=torch.float32)


def _fake_bwd(grad_y, x, weight, stats):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    _y, stats = output
    ctx.save_for_backward(x, weight, stats)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_stats):
    if grad_y is None:
        return None, None, None, None
    x, weight, stats = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fastnl.bn_relu_backward.default(grad_y, x, weight, stats)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None)


def _define_ops() -> None:
    if hasattr(torch.ops.fastnl, "bn_relu"):
        return
    define_op_pair("bn_relu", bn_relu_fwd, bn_relu_bwd, (_FWD_SCHEMA, _BWD_SCHEMA), (_fake_fwd, _fake_bwd),
                   (_backward, _setup_context))


_define_ops()


def batch_norm_relu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(y, stats) of the op: x [N, C, H, W] (contiguous or channels_last), weight and bias [C];
    stats [STATS, C] float32 rows: batch mean, 1/std, unbiased batch variance, scale (weight /
    std), bias, anchor, mean less the anchor (the last two: the mean as the kernels use it)."""
    return torch.ops.fastnl.bn_relu.default(x, weight, bias, float(eps))
