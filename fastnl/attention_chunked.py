"""The chunked attention engine: query blocks, tensor-core GEMMs, each score tile computed once.

``backend="chunked"`` and ``backend="torch"`` of :func:`fastnl.ops.nl_attention`. For each
block of query rows the engine computes the score tile ``S = Q_blk K^T`` [B, block, L] as one
GEMM with float32 output (on CUDA, half-precision operands stay in their dtype and run on tensor
cores: ``torch.bmm(..., out_dtype=torch.float32)``; elsewhere the operands are upcast to
float32), turns it into probabilities P in the operands' dtype, and multiplies ``P V``. The
backward recomputes each block's S once, and gets dV, dS, dQ and dK from it: executed work is
exactly the useful ``4 L^2 D`` (forward) and ``10 L^2 D`` (backward, the recomputation included)
flops. Extra memory is O(block * L + L * D) instead of O(L^2): the float32 score tiles of one
call live in buffers allocated once and reused by every block.

The row work between the GEMMs runs in two Triton kernels (``rowwise="triton"``:
:mod:`fastnl.kernels.softmax_rows`, one pass over each tile; the forward keeps O and two float32
numbers per row, the row maximum M and the sum Z, and the backward recomputes P as
``exp(scale * S - M) / Z``) or in PyTorch ops (``rowwise="torch"``, any device: the scale goes
into the GEMMs, the softmax is torch's fused kernel written over the tile, and the backward
recomputes P with the same kernel from the same S, so the forward keeps O only). Either way the
backward's probabilities round exactly like the forward's.
"""
from __future__ import annotations

import torch

from fastnl.vocabulary import ROWWISE

MAX_BLOCK = {"cpu": 1024, "cuda": 4096}
MIN_BLOCK = 64
# Elements of the score tile of one step ([clips, block, L]). The backward holds S and dP in
# float32 and P and dS in the operands' dtype at once (12-16 bytes per element).
TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}


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


def _scores(a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """alpha * a @ b with a float32 (float64) result: written into ``buf`` (a reused tile of
    that dtype) where a and b have it, else (half-precision operands) a new tile."""
    if buf is not None and a.dtype == buf.dtype:
        return torch.baddbmm(buf, a, b, beta=0, alpha=alpha, out=buf)
    s = _mm(a, b)
    return s.mul_(alpha) if alpha != 1.0 else s


def _mm_to(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """out[...] = alpha * a @ b, a and b in one dtype, out in that dtype or another."""
    if out.dtype == a.dtype:
        torch.baddbmm(out, a, b, beta=0, alpha=alpha, out=out)
        return
    prod = torch.bmm(a, b)
    out.copy_(prod.mul_(alpha) if alpha != 1.0 else prod)


_ACC_IN_PLACE = {"ok": True}


def _mm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc += alpha * a @ b, acc in float32 (float64) and a, b in acc's dtype or a half dtype
    (then one GEMM that reads and writes acc, or, where torch refuses that, a float32 product added)."""
    if a.dtype == acc.dtype:
        acc.baddbmm_(a, b, alpha=alpha)
        return
    if _ACC_IN_PLACE["ok"]:
        try:
            torch.baddbmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
            return
        except RuntimeError:
            _ACC_IN_PLACE["ok"] = False
    acc.add_(_mm(a, b), alpha=alpha)


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


class _TorchRows:
    """Softmax rows and their gradient in PyTorch ops, in place on the score tile. The scale is
    applied by the GEMMs (S arrives scaled, dS leaves without it), and the backward recomputes P
    with the forward's kernel from the same S, so no row statistics are kept (M, Z: None)."""

    SCALED_GEMMS = True

    @staticmethod
    def backward_from_probs(p, dp, delta, scale):
        return dp.sub_(delta.unsqueeze(-1)).mul_(p).to(p.dtype)

    @staticmethod
    def forward(s, scale, out_dtype):
        return _softmax_(s).to(out_dtype), None, None

    @staticmethod
    def backward(s, dp, m, z, delta, scale, out_dtype):
        p = _softmax_(s)
        ds = dp.sub_(delta.unsqueeze(-1)).mul_(p)
        return p.to(out_dtype), ds.to(out_dtype)


class _TritonRows:
    """The same with :mod:`fastnl.kernels.softmax_rows` (M in log2 units); float32 tiles only.
    The kernels scale S and dS themselves, and the backward reads the forward's M and Z."""

    SCALED_GEMMS = False

    @staticmethod
    def _kernels():
        from fastnl._paths import import_kernels

        return import_kernels().softmax_rows

    @classmethod
    def forward(cls, s, scale, out_dtype):
        return cls._kernels().softmax_rows(s, scale, out_dtype)

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


def _keeps_probs(q: torch.Tensor, clips: int, block: int, keep: bool) -> bool:
    """Whether the forward keeps P for the backward: asked to (a gradient is wanted) and the whole
    [B, L, L] score matrix fits one tile, so the memory stays within the tile budget and the
    backward skips recomputing S."""
    return keep and clips >= q.shape[0] and block >= q.shape[1]


def _uses_stats(rowwise: str, dtype: torch.dtype) -> bool:
    """Whether the forward saves the row statistics M and Z (the Triton row kernels do; the
    PyTorch row ops recompute P without them)."""
    return not _rows_impl(rowwise, _acc_dtype(dtype)).SCALED_GEMMS


def _tile_buffer(q: torch.Tensor, clips: int, block: int, dtype: torch.dtype) -> torch.Tensor | None:
    """One [clips, block, L] float32 (float64) score tile for every block of a call, where the
    operands have that dtype (half-precision GEMMs return their own tiles)."""
    B, L, _ = q.shape
    if _operand_dtype(q) != dtype:
        return None
    return torch.empty(min(clips, B) * min(block, L) * L, device=q.device, dtype=dtype)


def _tile(buf: torch.Tensor | None, clips: int, rows: int, L: int) -> torch.Tensor | None:
    """The contiguous [clips, rows, L] front of a tile buffer."""
    return None if buf is None else buf[: clips * rows * L].view(clips, rows, L)


def _forward(q, k, v, scale: float, clips: int, block: int, rowwise: str, keep: bool):
    """(O [B, L, D] in q's dtype, M [B, L] and Z [B, L] in float32 (float64) or, where the
    row work does not use them (:func:`_uses_stats`), empty; P [B, L, L] in the operands' dtype
    where :func:`_keeps_probs`, else None)."""
    qc, kc, vc = _operands(q), _operands(k), _operands(v)
    B, L, D = q.shape
    acc_dtype = _acc_dtype(q.dtype)
    rows = _rows_impl(rowwise, acc_dtype)
    gemm_scale = scale if rows.SCALED_GEMMS else 1.0
    out = torch.empty(B, L, D, device=q.device, dtype=q.dtype)
    stats = (B, L) if _uses_stats(rowwise, q.dtype) else (0,)
    m = torch.empty(stats, device=q.device, dtype=acc_dtype)
    z = torch.empty_like(m)
    keep = _keeps_probs(q, clips, block, keep)
    kept = None
    buf = _tile_buffer(q, clips, block, acc_dtype)
    for b0 in range(0, B, clips):
        cb = slice(b0, min(b0 + clips, B))
        kt, vb = kc[cb].transpose(1, 2), vc[cb]
        for start in range(0, L, block):
            rb = slice(start, min(start + block, L))
            s = _scores(qc[cb, rb], kt, _tile(buf, cb.stop - cb.start, rb.stop - rb.start, L), gemm_scale)
            p, m_blk, z_blk = rows.forward(s, scale, vc.dtype)
            if m_blk is not None:
                m[cb, rb], z[cb, rb] = m_blk, z_blk
            del s
            _mm_to(out[cb, rb], p, vb)
            kept = p if keep else None
    return out, m, z, kept


def _backward(grad_out, q, k, v, out, m, z, kept, scale: float, clips: int, block: int, rowwise: str):
    """(dQ, dK, dV), each [B, L, D] in its input's dtype, from the forward's O, M, Z (and P)."""
    acc_dtype = _acc_dtype(q.dtype)
    rows = _rows_impl(rowwise, acc_dtype)
    # the factor scale of dS = scale * P * (dP - delta): in the row kernel or in the GEMMs
    gemm_scale = scale if rows.SCALED_GEMMS else 1.0
    qc, kc, vc, doc = _operands(q), _operands(k), _operands(v), _operands(grad_out)
    B, L, D = q.shape
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    direct = k.dtype == acc_dtype and v.dtype == acc_dtype
    s_buf = None if kept is not None else _tile_buffer(q, clips, block, acc_dtype)
    dp_buf = _tile_buffer(q, clips, block, acc_dtype)
    for b0 in range(0, B, clips):
        cb = slice(b0, min(b0 + clips, B))
        kb, kt, vt = kc[cb], kc[cb].transpose(1, 2), vc[cb].transpose(1, 2)
        # dK and dV sum over the query blocks of a clip: accumulated in float32 (float64), in
        # the outputs themselves when they have that dtype
        if direct:
            dk_acc, dv_acc = dk[cb].zero_(), dv[cb].zero_()
        else:
            dk_acc = torch.zeros(kb.shape, device=k.device, dtype=acc_dtype)
            dv_acc = torch.zeros(kb.shape, device=k.device, dtype=acc_dtype)
        for start in range(0, L, block):
            rb = slice(start, min(start + block, L))
            n_clips, n_rows = cb.stop - cb.start, rb.stop - rb.start
            qb, dob = qc[cb, rb], doc[cb, rb]
            delta = (grad_out[cb, rb].to(acc_dtype) * out[cb, rb].to(acc_dtype)).sum(-1)
            dp = _scores(dob, vt, _tile(dp_buf, n_clips, n_rows, L), 1.0)
            if kept is not None:
                p, ds = kept, rows.backward_from_probs(kept, dp, delta, scale)
            else:
                s = _scores(qb, kt, _tile(s_buf, n_clips, n_rows, L), gemm_scale)
                stats = (m[cb, rb], z[cb, rb]) if m.numel() else (None, None)
                p, ds = rows.backward(s, dp, *stats, delta, scale, vc.dtype)
                del s
            del dp
            _mm_acc(dv_acc, p.transpose(1, 2), dob)
            del p
            _mm_to(dq[cb, rb], ds, kb, gemm_scale)
            _mm_acc(dk_acc, ds.transpose(1, 2), qb, gemm_scale)
        if not direct:
            dk[cb], dv[cb] = dk_acc, dv_acc
    return dq, dk, dv


# The engine as ``torch.library`` ops (``torch.ops.fastnl``), so that autograd, opcheck and
# torch.compile (fullgraph; the ops are opaque to it) see one op per direction. The forward op
# returns what the backward needs besides O: M, Z (empty tensors where the row work does not
# use them) and the kept P (an empty tensor when not kept); nl_attention_chunked returns O only.

_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float scale, int clips, int block, str rowwise, bool keep) "
               "-> (Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor m, Tensor z, Tensor? kept, "
               "float scale, int clips, int block, str rowwise) -> (Tensor, Tensor, Tensor)")


def _forward_op_body(q, k, v, scale, clips, block, rowwise, keep):
    out, m, z, kept = _forward(q, k, v, scale, clips, block, rowwise, keep)
    if kept is None:
        kept = q.new_empty((0,), dtype=_operand_dtype(v))
    return out, m, z, kept


def _forward_fake(q, k, v, scale, clips, block, rowwise, keep):
    B, L, D = q.shape
    acc_dtype = _acc_dtype(q.dtype)
    kept = q.new_empty((B, L, L) if _keeps_probs(q, clips, block, keep) else (0,), dtype=_operand_dtype(v))
    stats = (B, L) if _uses_stats(rowwise, q.dtype) else (0,)
    return q.new_empty((B, L, D)), q.new_empty(stats, dtype=acc_dtype), q.new_empty(stats, dtype=acc_dtype), kept


def _backward_fake(grad_out, q, k, v, out, m, z, kept, scale, clips, block, rowwise):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, clips, block, rowwise, keep = inputs
    out, m, z, kept = output
    ctx.save_for_backward(q, k, v, out, m, z, kept if _keeps_probs(q, clips, block, keep) else None)
    ctx.mark_non_differentiable(m, z, kept)
    ctx.scale, ctx.clips, ctx.block, ctx.rowwise = scale, clips, block, rowwise


def _backward_rule(ctx, grad_out, _grad_m, _grad_z, _grad_kept):
    q, k, v, out, m, z, kept = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, m, z, kept, ctx.scale, ctx.clips, ctx.block, ctx.rowwise)
    return dq, dk, dv, None, None, None, None, None


_forward_op = torch.library.custom_op("fastnl::nl_attention_chunked", _forward_op_body, mutates_args=(),
                                      schema=_FWD_SCHEMA)
_backward_op = torch.library.custom_op("fastnl::nl_attention_chunked_backward", _backward, mutates_args=(),
                                       schema=_BWD_SCHEMA)
_forward_op.register_fake(_forward_fake)
_backward_op.register_fake(_backward_fake)
_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)


def op_bodies() -> dict:
    """{op overload: its Python body} of the engine's two ops: what a ``TorchDispatchMode`` that
    must see every allocation inside them (the memory counter of :mod:`fastnl.benchmarks.memory`)
    runs instead of the opaque op."""
    return {torch.ops.fastnl.nl_attention_chunked.default: _forward_op_body,
            torch.ops.fastnl.nl_attention_chunked_backward.default: _backward}


def nl_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
                         block: int | None = None, rowwise: str = "torch", clips: int | None = None) -> torch.Tensor:
    """``softmax(scale * q @ k^T) @ v`` for q, k, v [B, L, D], ``block`` query rows of ``clips``
    clips at a time (default: :func:`plan`), the row work in ``rowwise`` ("triton" or "torch")."""
    if rowwise not in ROWWISE:
        raise ValueError(f"rowwise must be one of {ROWWISE}, got {rowwise!r}")
    default_clips, default_rows = plan(q.shape[1], q.shape[0], q.device.type)
    clips = default_clips if clips is None else clips
    block = default_rows if block is None else block
    if block < 1 or clips < 1:
        raise ValueError(f"block and clips must be >= 1, got block={block}, clips={clips}")
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _forward_op(q, k, v, float(scale), int(clips), int(block), rowwise, bool(keep))[0]

