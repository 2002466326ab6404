"""The chunked attention engine: query blocks, tensor-core GEMMs, each score tile computed once.

``backend="chunked"`` and ``backend="torch"`` of :func:`fastnl.ops.nl_attention`. For each
block of query rows the engine computes the score tile ``S = Q_blk K^T`` [B, block, L] as one
GEMM with float32 output (on CUDA, half-precision operands stay in their dtype and run on tensor
cores: ``torch.bmm(..., out_dtype=torch.float32)``; elsewhere the operands are upcast to
float32), turns it into probabilities P in the operands' dtype, and multiplies ``P V``. The
backward recomputes each block's S once, and gets dV, dS, dQ and dK from it: executed work is
exactly the useful ``4 L^2 D`` (forward) and ``10 L^2 D`` (backward, the recomputation included)
flops, less the recomputation for the query blocks whose P the forward kept (:func:`keep_budget`).
Extra memory is O(block * L + L * D) instead of O(L^2): the float32 score tiles of one call live
in buffers allocated once and reused by every block, and the kept P is at most 4 B L D elements.

The row work between the GEMMs runs in two Triton kernels (``rowwise="triton"``:
:mod:`fastnl.kernels.softmax_rows`, one pass over each tile; the forward keeps O and two float32
numbers per row, the row maximum M and the sum Z, and the backward recomputes P as
``exp(scale * S - M) / Z``) or in PyTorch ops (``rowwise="torch"``, any device: the scale and
torch's fused softmax written over the tile, as plain PyTorch computes them, and the backward
recomputes P with the same ops from the same S, so the forward keeps O only). Either way the
backward's probabilities round exactly like the forward's.
"""
from __future__ import annotations

import torch

from fastnl._library import define_op_pair
from fastnl.vocabulary import ROWWISE

MAX_BLOCK = {"cpu": 1024, "cuda": 4096}
MIN_BLOCK = 64
# Elements of the score tile of one step ([clips, block, L]). The backward holds S and dP in
# float32 and P and dS in the operands' dtype at once (12-16 bytes per element).
TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}
# Elements of P that the forward may keep for the backward of one call (when a gradient is
# wanted), so that the backward skips recomputing S for those query blocks: the first blocks in
# order, as many as fit, and never more elements than q, k, v and O hold together (4 B L D), so
# that the extra memory stays O(L D). A kept element saves 2 D flops of the recomputing GEMM for
# its bytes written and read. A CPU (about 0.2 TFLOP/s on 2 cores, float32) breaks even near
# D = 32 and gains from D = KEEP_MIN_HEAD_DIM on: up to 64 MB of P there, 4 of the 16 blocks at
# L = 8192, D = 512. An H100 does those flops about as fast as it moves the 4 bytes of a bf16 P
# even at D = 512, so CUDA keeps P only where one tile holds the whole score matrix (as
# everywhere, at any D).
KEEP_ELEMENTS = {"cpu": 1 << 24, "cuda": 0}
KEEP_MIN_HEAD_DIM = 128


def plan(seq_len: int, batch: int = 1, device_type: str = "cpu") -> tuple[int, int]:
    """(clips, block) of one step for B = ``batch`` clips of L = ``seq_len``: the tile budget
    TILE_ELEMENTS[device] goes to long query blocks first (the largest power of two up to
    MAX_BLOCK that covers L or fits, at least MIN_BLOCK), then to clips per step. Long blocks
    keep the GEMMs large and the dK/dV accumulation across blocks rare (a clip whose L fits in
    one block writes them once). CPU: 1024 rows up to L = 4096, 512 at 8192, 256 at 16384."""
    kind = device_type if device_type in TILE_ELEMENTS else "cpu"
    budget = TILE_ELEMENTS[kind]
    block = min(MAX_BLOCK[kind], 1 << max(0, seq_len - 1).bit_length())
    while block > MIN_BLOCK and block * seq_len > budget:
        block //= 2
    clips = max(1, min(batch, budget // (block * seq_len)))
    return clips, block


def keep_budget(seq_len: int, head_dim: int, batch: int = 1, device_type: str = "cpu") -> int:
    """Elements of P the forward keeps at most for B = ``batch`` clips of L = ``seq_len`` at head
    dim D: KEEP_ELEMENTS[device] capped at 4 B L D where D >= KEEP_MIN_HEAD_DIM, or the whole
    score matrix where :func:`plan` covers it in one tile."""
    kind = device_type if device_type in KEEP_ELEMENTS else "cpu"
    clips, block = plan(seq_len, batch, device_type)
    whole = batch * seq_len * seq_len if clips >= batch and block >= seq_len else 0
    blocks = min(KEEP_ELEMENTS[kind], 4 * batch * seq_len * head_dim) if head_dim >= KEEP_MIN_HEAD_DIM else 0
    return max(blocks, whole)


def steps(batch: int, seq_len: int, clips: int, block: int):
    """The engine's steps in order: (clip slice, row slice) of each [clips, block, L] tile."""
    for b0 in range(0, batch, clips):
        for start in range(0, seq_len, block):
            yield slice(b0, min(b0 + clips, batch)), slice(start, min(start + block, seq_len))


def kept_steps(batch: int, seq_len: int, clips: int, block: int, keep: int) -> tuple[int, int]:
    """(steps, elements) of P the forward keeps within ``keep`` elements: the longest run of
    leading steps that fits."""
    count = total = 0
    for cb, rb in steps(batch, seq_len, clips, block):
        size = (cb.stop - cb.start) * (rb.stop - rb.start) * seq_len
        if total + size > keep:
            break
        count, total = count + 1, total + size
    return count, total


def kept_fraction(seq_len: int, head_dim: int, batch: int = 1, device_type: str = "cpu") -> float:
    """The share of the score matrix whose P the forward keeps (by default, with a gradient)."""
    clips, block = plan(seq_len, batch, device_type)
    _, total = kept_steps(batch, seq_len, clips, block, keep_budget(seq_len, head_dim, batch, device_type))
    return total / (batch * seq_len * seq_len)


def default_block(seq_len: int, batch: int = 1, device_type: str = "cpu") -> int:
    """The query block of :func:`plan`."""
    return plan(seq_len, batch, device_type)[1]


def _has_out_dtype() -> bool:
    return hasattr(torch.ops.aten.bmm, "dtype") and hasattr(torch.ops.aten.baddbmm, "dtype_out")


_OUT_DTYPE = _has_out_dtype()


def tensor_core_operands(t: torch.Tensor) -> bool:
    """Whether GEMMs on ``t`` keep its half-precision dtype with float32 output (CUDA, torch with
    ``out_dtype`` on bmm); otherwise half-precision operands are upcast to float32."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and _OUT_DTYPE


def _operands(t: torch.Tensor) -> torch.Tensor:
    """t as the engine multiplies it: kept when tensor cores take it or it is float32/64."""
    if t.dtype in (torch.float32, torch.float64) or tensor_core_operands(t):
        return t
    return t.float()


_OUT_DTYPE_FAILED: list = []


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 (float64 for float64) result, batched. Should torch refuse the
    half-precision GEMM with float32 output, the operands are upcast (no tensor cores; warned once)."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.bmm(a, b)
    if not _OUT_DTYPE_FAILED:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except RuntimeError as err:
            import warnings

            _OUT_DTYPE_FAILED.append(str(err))
            warnings.warn("fastnl chunked attention: torch.bmm(..., out_dtype=torch.float32) failed "
                          f"({str(err).splitlines()[0][:160]}); multiplying in float32 instead (no tensor cores)",
                          RuntimeWarning, stacklevel=2)
    return torch.bmm(a.float(), b.float())


def _scores(a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """a @ b with a float32 (float64) result: written into ``buf`` (a reused tile of that dtype)
    where a and b have it, else (half-precision operands) a new tile."""
    if buf is not None and a.dtype == buf.dtype:
        return torch.bmm(a, b, out=buf)
    return _mm(a, b)


def _mm_to(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out[...] = a @ b, a and b in one dtype, out in that dtype or another."""
    if out.dtype == a.dtype:
        torch.bmm(a, b, out=out)
        return
    out.copy_(torch.bmm(a, b))


_ACC_IN_PLACE = {"ok": True}


def _mm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in float32 (float64) and a, b in acc's dtype or a half dtype (then one
    GEMM that reads and writes acc, or, where torch refuses that, a float32 product added)."""
    if a.dtype == acc.dtype:
        acc.baddbmm_(a, b)
        return
    if _ACC_IN_PLACE["ok"]:
        try:
            torch.baddbmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except RuntimeError:
            _ACC_IN_PLACE["ok"] = False
    acc.add_(_mm(a, b))


_SOFTMAX_IN_PLACE = {"ok": True}
_softmax_out = torch.ops.aten._softmax.out


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension written over s (torch's fused kernel, one read and one
    write per element); where torch refuses ``out=s``, computed aside and copied back."""
    if _SOFTMAX_IN_PLACE["ok"]:
        try:
            return _softmax_out(s, -1, False, out=s)
        except RuntimeError:
            _SOFTMAX_IN_PLACE["ok"] = False
    return s.copy_(torch.softmax(s, -1))


def _scaled_(s: torch.Tensor, scale: float) -> torch.Tensor:
    """s *= scale in place, skipped at scale 1. (Not folded into the GEMM as its alpha: a BLAS
    scales an operand before multiplying, whose rounding the cancellation in a dot product then
    magnifies: at logits x10 the output error reached 2.3x plain's that way.)"""
    return s.mul_(scale) if scale != 1.0 else s


class _TorchRows:
    """Softmax rows and their gradient in PyTorch ops, in place on the score tile: the scale,
    then torch's fused softmax written over the tile, as plain PyTorch computes them. The
    backward recomputes P with the same ops from the same S, so no row statistics are kept
    (M, Z: None)."""

    IN_PLACE = True

    @staticmethod
    def backward_from_probs(p, dp, delta, scale):
        return _scaled_(dp.sub_(delta.unsqueeze(-1)).mul_(p), scale).to(p.dtype)

    @staticmethod
    def forward(s, scale, out_dtype, out=None):
        p = _softmax_(_scaled_(s, scale))
        return (p.to(out_dtype) if out is None else out.copy_(p)), None, None

    @staticmethod
    def backward(s, dp, m, z, delta, scale, out_dtype):
        p = _softmax_(_scaled_(s, scale))
        ds = _scaled_(dp.sub_(delta.unsqueeze(-1)).mul_(p), scale)
        return p.to(out_dtype), ds.to(out_dtype)


class _TritonRows:
    """The same with :mod:`fastnl.kernels.softmax_rows` (M: the row maximum of sign(scale) * S);
    float32 tiles only. The kernels write P and dS beside S, and the backward reads the forward's M and Z."""

    IN_PLACE = False

    @staticmethod
    def _kernels():
        from fastnl._paths import import_kernels

        return import_kernels().softmax_rows

    @classmethod
    def forward(cls, s, scale, out_dtype, out=None):
        return cls._kernels().softmax_rows(s, scale, out_dtype, out=out)

    @classmethod
    def backward(cls, s, dp, m, z, delta, scale, out_dtype):
        return cls._kernels().softmax_grad_rows(s, dp, m, z, delta, scale, out_dtype)

    @classmethod
    def backward_from_probs(cls, p, dp, delta, scale):
        return cls._kernels().softmax_grad_from_probs(p, dp, delta, scale)


def _rows_impl(rowwise: str, compute_dtype: torch.dtype):
    # the Triton row kernels take float32 tiles; float64 inputs use the PyTorch ops
    return _TritonRows if rowwise == "triton" and compute_dtype == torch.float32 else _TorchRows


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _operand_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of :func:`_operands` (t), without making the tensor."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) or tensor_core_operands(t) else torch.float32


def _uses_stats(rowwise: str, dtype: torch.dtype) -> bool:
    """Whether the forward saves the row statistics M and Z (the Triton row kernels do; the
    PyTorch row ops recompute P without them)."""
    return not _rows_impl(rowwise, _acc_dtype(dtype)).IN_PLACE


class _Tiles:
    """One [clips, block, L] float32 (float64) score tile reused by every step of a call,
    allocated at first use, where the operands have that dtype (half-precision GEMMs return
    their own tiles: :meth:`get` gives None)."""

    def __init__(self, q: torch.Tensor, clips: int, block: int, dtype: torch.dtype):
        B, L, _ = q.shape
        self.size, self.L, self.dtype, self.device = min(clips, B) * min(block, L) * L, L, dtype, q.device
        self.used = _operand_dtype(q) == dtype
        self.buf = None

    def get(self, clips: int, rows: int) -> torch.Tensor | None:
        if not self.used:
            return None
        if self.buf is None:
            self.buf = torch.empty(self.size, device=self.device, dtype=self.dtype)
        return self.buf[: clips * rows * self.L].view(clips, rows, self.L)


class _Kept:
    """The P of the first steps, kept for the backward: one flat tensor in the operands' dtype,
    step after step ([clips, rows, L] each)."""

    def __init__(self, flat: torch.Tensor, count: int, L: int):
        self.flat, self.count, self.L, self.offset = flat, count, L, 0

    def next(self, index: int, clips: int, rows: int) -> torch.Tensor | None:
        """The slot of step ``index`` (steps are asked for in order), or None past the kept ones."""
        if index >= self.count:
            return None
        size = clips * rows * self.L
        slot = self.flat[self.offset: self.offset + size].view(clips, rows, self.L)
        self.offset += size
        return slot


def _forward(q, k, v, scale: float, clips: int, block: int, rowwise: str, keep: int):
    """(O [B, L, D] in q's dtype; M [B, L] and Z [B, L] in float32 (float64) or, where the
    row work does not use them (:func:`_uses_stats`), empty; the P of the leading steps within
    ``keep`` elements (:func:`kept_steps`), flat in the operands' dtype, or empty)."""
    qc, kc, vc = _operands(q), _operands(k), _operands(v)
    B, L, D = q.shape
    acc_dtype = _acc_dtype(q.dtype)
    rows = _rows_impl(rowwise, acc_dtype)
    out = torch.empty(B, L, D, device=q.device, dtype=q.dtype)
    stats = (B, L) if _uses_stats(rowwise, q.dtype) else (0,)
    m = torch.empty(stats, device=q.device, dtype=acc_dtype)
    z = torch.empty_like(m)
    count, total = kept_steps(B, L, clips, block, keep)
    kept = _Kept(torch.empty(total, device=q.device, dtype=vc.dtype), count, L)
    tiles = _Tiles(q, clips, block, acc_dtype)
    for index, (cb, rb) in enumerate(steps(B, L, clips, block)):
        n_clips, n_rows = cb.stop - cb.start, rb.stop - rb.start
        slot = kept.next(index, n_clips, n_rows)
        # the PyTorch row ops turn S into P in place: a kept step's S goes to its slot directly
        in_slot = slot is not None and rows.IN_PLACE and slot.dtype == acc_dtype and tiles.used
        s = _scores(qc[cb, rb], kc[cb].transpose(1, 2), slot if in_slot else tiles.get(n_clips, n_rows))
        # P goes to the slot: in place on S there, or written there by the row work
        p, m_blk, z_blk = rows.forward(s, scale, vc.dtype, out=None if in_slot else slot)
        if m_blk is not None:
            m[cb, rb], z[cb, rb] = m_blk, z_blk
        del s
        _mm_to(out[cb, rb], p, vc[cb])
    return out, m, z, kept.flat


def _backward(grad_out, q, k, v, out, m, z, kept, scale: float, clips: int, block: int, rowwise: str):
    """(dQ, dK, dV), each [B, L, D] in its input's dtype, from the forward's O, M, Z (and the
    kept P of the leading steps, flat: as many whole steps as it holds)."""
    acc_dtype = _acc_dtype(q.dtype)
    rows = _rows_impl(rowwise, acc_dtype)
    qc, kc, vc, doc = _operands(q), _operands(k), _operands(v), _operands(grad_out)
    B, L, D = q.shape
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    direct = k.dtype == acc_dtype and v.dtype == acc_dtype
    flat = kept if kept is not None else q.new_empty((0,), dtype=vc.dtype)
    count, _ = kept_steps(B, L, clips, block, flat.numel())
    kept_p = _Kept(flat, count, L)
    s_tiles, dp_tiles = _Tiles(q, clips, block, acc_dtype), _Tiles(q, clips, block, acc_dtype)
    dk_acc = dv_acc = None
    for index, (cb, rb) in enumerate(steps(B, L, clips, block)):
        n_clips, n_rows = cb.stop - cb.start, rb.stop - rb.start
        kb, kt, vt = kc[cb], kc[cb].transpose(1, 2), vc[cb].transpose(1, 2)
        if rb.start == 0:
            # dK and dV sum over the query blocks of a clip: accumulated in float32 (float64), in
            # the outputs themselves when they have that dtype
            if direct:
                dk_acc, dv_acc = dk[cb].zero_(), dv[cb].zero_()
            else:
                dk_acc = torch.zeros(kb.shape, device=k.device, dtype=acc_dtype)
                dv_acc = torch.zeros(kb.shape, device=k.device, dtype=acc_dtype)
        qb, dob = qc[cb, rb], doc[cb, rb]
        delta = (grad_out[cb, rb].to(acc_dtype) * out[cb, rb].to(acc_dtype)).sum(-1)
        dp = _scores(dob, vt, dp_tiles.get(n_clips, n_rows))
        p = kept_p.next(index, n_clips, n_rows)
        if p is not None:
            ds = rows.backward_from_probs(p, dp, delta, scale)
        else:
            s = _scores(qb, kt, s_tiles.get(n_clips, n_rows))
            stats = (m[cb, rb], z[cb, rb]) if m.numel() else (None, None)
            p, ds = rows.backward(s, dp, *stats, delta, scale, vc.dtype)
            del s
        del dp
        _mm_acc(dv_acc, p.transpose(1, 2), dob)
        del p
        _mm_to(dq[cb, rb], ds, kb)  # ds carries the factor scale
        _mm_acc(dk_acc, ds.transpose(1, 2), qb)
        if rb.stop == L and not direct:
            dk[cb], dv[cb] = dk_acc, dv_acc
    return dq, dk, dv


# The engine as ``torch.library`` ops (``torch.ops.fastnl``), so that autograd, opcheck and
# torch.compile (fullgraph; the ops are opaque to it) see one op per direction. The forward op
# returns what the backward needs besides O: M, Z (empty tensors where the row work does not
# use them) and the kept P (flat; empty when none is kept); nl_attention_chunked returns O only.

_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float scale, int clips, int block, str rowwise, int keep) "
               "-> (Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor m, Tensor z, Tensor? kept, "
               "float scale, int clips, int block, str rowwise) -> (Tensor, Tensor, Tensor)")


def _forward_op_body(q, k, v, scale, clips, block, rowwise, keep):
    return _forward(q, k, v, scale, clips, block, rowwise, keep)


def _forward_fake(q, k, v, scale, clips, block, rowwise, keep):
    B, L, D = q.shape
    acc_dtype = _acc_dtype(q.dtype)
    kept = q.new_empty((kept_steps(B, L, clips, block, keep)[1],), dtype=_operand_dtype(v))
    stats = (B, L) if _uses_stats(rowwise, q.dtype) else (0,)
    return q.new_empty((B, L, D)), q.new_empty(stats, dtype=acc_dtype), q.new_empty(stats, dtype=acc_dtype), kept


def _backward_fake(grad_out, q, k, v, out, m, z, kept, scale, clips, block, rowwise):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, clips, block, rowwise, keep = inputs
    out, m, z, kept = output
    ctx.save_for_backward(q, k, v, out, m, z, kept if kept.numel() else None)
    ctx.mark_non_differentiable(m, z, kept)
    # no zero gradients made for M, Z and the kept P (as large as P itself) on the way back
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.clips, ctx.block, ctx.rowwise = scale, clips, block, rowwise


def _backward_rule(ctx, grad_out, _grad_m, _grad_z, _grad_kept):
    q, k, v, out, m, z, kept = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None, None
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, m, z, kept, ctx.scale, ctx.clips, ctx.block, ctx.rowwise)
    return dq, dk, dv, None, None, None, None, None


_forward_op, _backward_op = define_op_pair("nl_attention_chunked", _forward_op_body, _backward,
                                           (_FWD_SCHEMA, _BWD_SCHEMA), (_forward_fake, _backward_fake),
                                           (_backward_rule, _setup_context))


def op_bodies() -> dict:
    """{op overload: its Python body} of the engine's two ops: what a ``TorchDispatchMode`` that
    must see every allocation inside them (the memory counter of :mod:`fastnl.benchmarks.memory`)
    runs instead of the opaque op."""
    return {torch.ops.fastnl.nl_attention_chunked.default: _forward_op_body,
            torch.ops.fastnl.nl_attention_chunked_backward.default: _backward}


def nl_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
                         block: int | None = None, rowwise: str = "torch", clips: int | None = None,
                         keep: int | None = None) -> torch.Tensor:
    """``softmax(scale * q @ k^T) @ v`` for q, k, v [B, L, D], ``block`` query rows of ``clips``
    clips at a time (default: :func:`plan`), the row work in ``rowwise`` ("triton" or "torch").
    When a gradient is wanted, the forward keeps the P of the leading steps within ``keep``
    elements (default: :func:`keep_budget`; 0 recomputes every S in the backward)."""
    if rowwise not in ROWWISE:
        raise ValueError(f"rowwise must be one of {ROWWISE}, got {rowwise!r}")
    B, L = q.shape[0], q.shape[1]
    default_clips, default_rows = plan(L, B, q.device.type)
    clips = default_clips if clips is None else clips
    block = default_rows if block is None else block
    if block < 1 or clips < 1:
        raise ValueError(f"block and clips must be >= 1, got block={block}, clips={clips}")
    if keep is not None and keep < 0:
        raise ValueError(f"keep must be >= 0 elements, got {keep}")
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    budget = (keep_budget(L, q.shape[2], B, q.device.type) if keep is None else keep) if wanted else 0
    return _forward_op(q, k, v, float(scale), int(clips), int(block), rowwise, int(budget))[0]
