"""The chunked attention engine: query blocks, tensor-core GEMMs, each score tile computed once.

``backend="chunked"`` and ``backend="torch"`` of :func:`fastnl.ops.nl_attention`. For each
block of query rows the engine computes the score tile ``S = Q_blk K^T`` [B, block, L] as one
GEMM with float32 output (on CUDA, half-precision operands stay in their dtype and run on tensor
cores: ``torch.bmm(..., out_dtype=torch.float32)``; elsewhere the operands are upcast to
float32), turns it into probabilities P in the operands' dtype, and multiplies ``P V``. The
forward keeps only O and two float32 numbers per row (the row maximum M and the sum Z of the
softmax); the backward recomputes each block's S once, and gets dV, dS, dQ and dK from it:
executed work is exactly the useful ``4 L^2 D`` (forward) and ``10 L^2 D`` (backward, the
recomputation included) flops. Extra memory is O(block * L + L * D) instead of O(L^2).

The row work between the GEMMs (softmax; ``dS = P * (dP - delta)``) runs in two Triton kernels
(``rowwise="triton"``: :mod:`fastnl.kernels.softmax_rows`, one pass over each tile) or in plain
PyTorch ops (``rowwise="torch"``, any device). The backward recomputes P as
``exp(scale * S - M) / Z`` from the same GEMM as the forward, so its probabilities round exactly
like the forward's.
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


class _TorchRows:
    """Softmax rows and their gradient in PyTorch ops (in place on the score tile)."""

    @staticmethod
    def backward_from_probs(p, dp, delta, scale):
        return dp.sub_(delta.unsqueeze(-1)).mul_(p).mul_(scale).to(p.dtype)

    @staticmethod
    def forward(s, scale, out_dtype):
        s.mul_(scale)
        m = s.amax(dim=-1)
        s.sub_(m.unsqueeze(-1)).exp_()
        z = s.sum(dim=-1)
        s.div_(z.unsqueeze(-1))
        return s.to(out_dtype), m, z

    @staticmethod
    def backward(s, dp, m, z, delta, scale, out_dtype):
        p = s.mul_(scale).sub_(m.unsqueeze(-1)).exp_().div_(z.unsqueeze(-1))
        ds = dp.sub_(delta.unsqueeze(-1)).mul_(p).mul_(scale)
        return p.to(out_dtype), ds.to(out_dtype)


class _TritonRows:
    """The same with :mod:`fastnl.kernels.softmax_rows` (M in log2 units); float32 tiles only."""

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


def _forward(q, k, v, scale: float, clips: int, block: int, rowwise: str, keep: bool):
    """(O [B, L, D] in q's dtype, M [B, L], Z [B, L] in float32 (float64), P [B, L, L] in the
    operands' dtype where :func:`_keeps_probs`, else None)."""
    qc, kc, vc = _operands(q), _operands(k), _operands(v)
    B, L, D = q.shape
    acc_dtype = _acc_dtype(q.dtype)
    rows = _rows_impl(rowwise, acc_dtype)
    out = torch.empty(B, L, D, device=q.device, dtype=q.dtype)
    m = torch.empty(B, L, device=q.device, dtype=acc_dtype)
    z = torch.empty_like(m)
    keep = _keeps_probs(q, clips, block, keep)
    kept = None
    for b0 in range(0, B, clips):
        cb = slice(b0, min(b0 + clips, B))
        kt, vb = kc[cb].transpose(1, 2), vc[cb]
        for start in range(0, L, block):
            rb = slice(start, min(start + block, L))
            s = _mm(qc[cb, rb], kt)
            p, m[cb, rb], z[cb, rb] = rows.forward(s, scale, vc.dtype)
            del s
            out[cb, rb] = torch.bmm(p, vb)
            kept = p if keep else None
    return out, m, z, kept


def _backward(grad_out, q, k, v, out, m, z, kept, scale: float, clips: int, block: int, rowwise: str):
    """(dQ, dK, dV), each [B, L, D] in its input's dtype, from the forward's O, M, Z (and P)."""
    acc_dtype = m.dtype
    rows = _rows_impl(rowwise, acc_dtype)
    qc, kc, vc, doc = _operands(q), _operands(k), _operands(v), _operands(grad_out)
    B, L, D = q.shape
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    direct = k.dtype == acc_dtype and v.dtype == acc_dtype
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
            qb, dob = qc[cb, rb], doc[cb, rb]
            delta = (grad_out[cb, rb].to(acc_dtype) * out[cb, rb].to(acc_dtype)).sum(-1)
            dp = _mm(dob, vt)
            if kept is not None:
                p, ds = kept, rows.backward_from_probs(kept, dp, delta, scale)
            else:
                s = _mm(qb, kt)
                p, ds = rows.backward(s, dp, m[cb, rb], z[cb, rb], delta, scale, vc.dtype)
                del s
            del dp
            _mm_acc(dv_acc, p.transpose(1, 2), dob)
            del p
            dq[cb, rb] = torch.bmm(ds, kb)  # ds carries the factor scale
            _mm_acc(dk_acc, ds.transpose(1, 2), qb)
        if not direct:
            dk[cb], dv[cb] = dk_acc, dv_acc
    return dq, dk, dv


# The engine as ``torch.library`` ops (``torch.ops.fastnl``), so that autograd, opcheck and
# torch.compile (fullgraph; the ops are opaque to it) see one op per direction. The forward op
# returns what the backward needs besides O: M, Z and the kept P (an empty tensor when not
# kept); nl_attention_chunked returns O only.

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
    return q.new_empty((B, L, D)), q.new_empty((B, L), dtype=acc_dtype), q.new_empty((B, L), dtype=acc_dtype), kept


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

