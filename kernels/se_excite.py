"""The SE module's excitation, ``gate = sigmoid(fc2(relu(fc1(squeeze))))`` on the [N, C] squeeze
(fc1: C -> R, fc2: R -> C, both with bias), as Triton kernels: one forward kernel and two
backward kernels where plain PyTorch runs four and eight (two convolutions with their bias,
a ReLU and a sigmoid, and their backward: three kernels per convolution, one per activation),
every one of them far shorter than a kernel launch at the model's sizes (N = 256 frames, C up to
2048, R = C / 16).

Half precision only (float16, bfloat16: the model's mixed-precision training; in float32 the
exact products' register tiles spill at R = 128). Forward (``_excite_fwd``, one program per
block of BLOCK_N images): ``h = relu(s W1^T + b1)`` accumulated over channel blocks on tensor
cores (float32 accumulation), kept in float32 for the backward and rounded to the inputs'
dtype for the second product, ``gate = sigmoid(h W2^T + b2)`` in float32, rounded once to the
squeeze's dtype.

Backward, with ``dz = dgate * gate * (1 - gate)``:

- ``_excite_bwd_rows`` (per block of images): dz (float32, written for the weights' kernel),
  ``dh = (dz W2) * (h > 0)`` (float32, written) and the squeeze's gradient ``ds = dh W1``.
- ``_excite_bwd_weights`` (per block of channels): ``dW2 = dz^T h``, ``db2 = sum_n dz``,
  ``dW1 = dh^T s`` over every image, and (the first program) ``db1 = sum_n dh``, in float32,
  each rounded once to the weights' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnl._library import define_op
from fastnl.vocabulary import triton_interpreted

from .batch_norm import _rounded

BLOCK_N = 16  # images per program (the tensor cores' smallest M)
WEIGHT_TILE = 1024  # elements of a [channels, reduced units] weight tile a step loads (4 warps)
MAX_R = 128  # reduced units the kernels hold in one tile (SE-ResNet50's widest, C = 2048)


@triton.jit
def _mm(a, b, INTERPRETED: tl.constexpr):
    """a @ b (half-precision operands) with float32 accumulation. Interpreted: in float32, whose
    products of half-precision values are exact, as the tensor cores' (the Triton interpreter's
    tl.dot multiplies the raw bits of bfloat16 operands)."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _image_block(N, R, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's images n and the reduced units r, with their masks."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    return n, r, n < N, r < R


@triton.jit
def _channels(c0, C, BLOCK_C: tl.constexpr):
    c = c0 + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def _excite_fwd(SQ, W1, B1, W2, B2, H, GATE, N, C, R, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_R: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (image blocks,): H [N, R] float32 = relu(s W1^T + b1); GATE [N, C] = sigmoid(h W2^T + b2)
    in GATE's dtype. SQ [N, C], W1 [R, C], W2 [C, R], all contiguous, of one dtype; B1, B2 too."""
    n, r, n_ok, r_ok = _image_block(N, R, BLOCK_N, BLOCK_R)
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c, c_ok = _channels(c0, C, BLOCK_C)
        s = tl.load(SQ + n[:, None] * C + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        w1t = tl.load(W1 + r[None, :] * C + c[:, None], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        acc += _mm(s, w1t, INTERPRETED)
    h = acc + tl.load(B1 + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.where(h > 0.0, h, 0.0)
    tl.store(H + n[:, None] * R + r[None, :], h, mask=n_ok[:, None] & r_ok[None, :])
    hq = _rounded(h, W2.dtype.element_ty, INTERPRETED)  # to nearest (the interpreter's .to truncates)
    for c0 in range(0, C, BLOCK_C):
        c, c_ok = _channels(c0, C, BLOCK_C)
        w2t = tl.load(W2 + c[None, :] * R + r[:, None], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        z = _mm(hq, w2t, INTERPRETED) + tl.load(B2 + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        gate = 1.0 / (1.0 + tl.exp(-z))
        tl.store(GATE + n[:, None] * C + c[None, :], _rounded(gate, GATE.dtype.element_ty, INTERPRETED),
                 mask=n_ok[:, None] & c_ok[None, :])


@triton.jit
def _excite_bwd_rows(DGATE, GATE, H, W1, W2, DZ, DH, DSQ, N, C, R, BLOCK_N: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (image blocks,): DZ [N, C] = dgate gate (1 - gate), DH [N, R] = (dz W2) (h > 0), both
    float32; DSQ [N, C] = dh W1 in DSQ's dtype."""
    n, r, n_ok, r_ok = _image_block(N, R, BLOCK_N, BLOCK_R)
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c, c_ok = _channels(c0, C, BLOCK_C)
        at, mask = n[:, None] * C + c[None, :], n_ok[:, None] & c_ok[None, :]
        gate = tl.load(GATE + at, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DGATE + at, mask=mask, other=0.0).to(tl.float32) * gate * (1.0 - gate)
        tl.store(DZ + at, dz, mask=mask)
        w2 = tl.load(W2 + c[:, None] * R + r[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        acc += _mm(_rounded(dz, W2.dtype.element_ty, INTERPRETED), w2, INTERPRETED)
    h_at, h_mask = n[:, None] * R + r[None, :], n_ok[:, None] & r_ok[None, :]
    dh = tl.where(tl.load(H + h_at, mask=h_mask, other=0.0) > 0.0, acc, 0.0)
    tl.store(DH + h_at, dh, mask=h_mask)
    dhq = _rounded(dh, W1.dtype.element_ty, INTERPRETED)
    for c0 in range(0, C, BLOCK_C):
        c, c_ok = _channels(c0, C, BLOCK_C)
        w1 = tl.load(W1 + r[:, None] * C + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        ds = _mm(dhq, w1, INTERPRETED)
        tl.store(DSQ + n[:, None] * C + c[None, :], _rounded(ds, DSQ.dtype.element_ty, INTERPRETED),
                 mask=n_ok[:, None] & c_ok[None, :])


@triton.jit
def _excite_bwd_weights(DZ, DH, H, SQ, DW1, DB1, DW2, DB2, N, C, R, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (channel blocks,): over every image, DW2[c, :] = dz[:, c]^T h, DB2[c] = sum_n dz[:, c],
    DW1[:, c] = dh^T s[:, c]; program 0 also DB1 = sum_n dh. Exact float32 products and sums,
    each result rounded once to its tensor's dtype."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    c_ok, r_ok = c < C, r < R
    dw2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    db2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        nc_mask, nr_mask = n_ok[:, None] & c_ok[None, :], n_ok[:, None] & r_ok[None, :]
        dz = tl.load(DZ + n[:, None] * C + c[None, :], mask=nc_mask, other=0.0)
        s = tl.load(SQ + n[:, None] * C + c[None, :], mask=nc_mask, other=0.0).to(tl.float32)
        h = tl.load(H + n[:, None] * R + r[None, :], mask=nr_mask, other=0.0)
        dh = tl.load(DH + n[:, None] * R + r[None, :], mask=nr_mask, other=0.0)
        dw2 += tl.dot(tl.trans(dz), h, input_precision="ieee")
        dw1 += tl.dot(tl.trans(dh), s, input_precision="ieee")
        db2 += tl.sum(dz, 0)
        db1 += tl.sum(dh, 0)
    tl.store(DW2 + c[:, None] * R + r[None, :], _rounded(dw2, DW2.dtype.element_ty, INTERPRETED),
             mask=c_ok[:, None] & r_ok[None, :])
    tl.store(DB2 + c, _rounded(db2, DB2.dtype.element_ty, INTERPRETED), mask=c_ok)
    tl.store(DW1 + r[:, None] * C + c[None, :], _rounded(dw1, DW1.dtype.element_ty, INTERPRETED),
             mask=r_ok[:, None] & c_ok[None, :])
    if tl.program_id(0) == 0:
        tl.store(DB1 + r, _rounded(db1, DB1.dtype.element_ty, INTERPRETED), mask=r_ok)


KERNELS = {"se_excite_fwd": _excite_fwd, "se_excite_bwd_rows": _excite_bwd_rows,
           "se_excite_bwd_weights": _excite_bwd_weights}


def blocks(R: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_R) for R reduced units: R padded to a power of 2 (at least 16, the tensor
    cores' smallest K and N), the channels of a step so that a weight tile holds
    ``WEIGHT_TILE`` elements (16 to 128)."""
    block_r = max(16, triton.next_power_of_2(R))
    return max(16, min(128, WEIGHT_TILE // block_r)), block_r


def _launches(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def excite_fwd(squeeze: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
    """(gate, h): gate [N, C] in the squeeze's dtype, h [N, R] float32 (after the ReLU). squeeze
    [N, C], w1 [R, C], b1 [R], w2 [C, R], b2 [C], contiguous, of one half-precision dtype."""
    N, C = squeeze.shape
    R = w1.shape[0]
    gate = torch.empty_like(squeeze)
    h = squeeze.new_empty((N, R), dtype=torch.float32)
    if not _launches(squeeze):
        return gate, h
    block_c, block_r = blocks(R)
    _excite_fwd[(triton.cdiv(N, BLOCK_N),)](squeeze, w1, b1, w2, b2, h, gate, N, C, R, BLOCK_N=BLOCK_N,
                                            BLOCK_C=block_c, BLOCK_R=block_r,
                                            INTERPRETED=triton_interpreted(), num_warps=4)
    return gate, h


def excite_bwd(grad_gate: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, squeeze: torch.Tensor,
               w1: torch.Tensor, w2: torch.Tensor):
    """(dsqueeze, dw1, db1, dw2, db2): the squeeze's gradient in its dtype, the weights' and
    biases' in the weights' (each rounded once from float32)."""
    N, C = squeeze.shape
    R = w1.shape[0]
    dsq = torch.empty_like(squeeze)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    db1, db2 = w1.new_empty(R), w2.new_empty(C)
    if not _launches(squeeze):
        return dsq, dw1, db1, dw2, db2
    dz = squeeze.new_empty((N, C), dtype=torch.float32)
    dh = squeeze.new_empty((N, R), dtype=torch.float32)
    block_c, block_r = blocks(R)
    _excite_bwd_rows[(triton.cdiv(N, BLOCK_N),)](grad_gate, gate, h, w1, w2, dz, dh, dsq, N, C, R, BLOCK_N=BLOCK_N,
                                                 BLOCK_C=block_c, BLOCK_R=block_r,
                                                      INTERPRETED=triton_interpreted(), num_warps=4)
    _excite_bwd_weights[(triton.cdiv(C, block_c),)](dz, dh, h, squeeze, dw1, db1, dw2, db2, N, C, R, BLOCK_N=BLOCK_N,
                                                    BLOCK_C=block_c, BLOCK_R=block_r,
                                                    INTERPRETED=triton_interpreted(), num_warps=4)
    return dsq, dw1, db1, dw2, db2


def _fake_fwd(squeeze, w1, b1, w2, b2):
    return torch.empty_like(squeeze), squeeze.new_empty((squeeze.shape[0], w1.shape[0]), dtype=torch.float32)


def _fake_bwd(grad_gate, gate, h, squeeze, w1, w2):
    return (torch.empty_like(squeeze), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


_OPS = {
    "se_excite": (excite_fwd, "(Tensor squeeze, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> (Tensor, Tensor)",
                  _fake_fwd),
    "se_excite_bwd": (excite_bwd, "(Tensor grad_gate, Tensor gate, Tensor h, Tensor squeeze, Tensor w1, Tensor w2) "
                                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_bwd),
}

for _name, (_fn, _schema, _fake) in _OPS.items():
    if not hasattr(torch.ops.fastnl, _name):
        define_op(_name, _fn, _schema, _fake)
