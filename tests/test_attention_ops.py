"""The attention engines as ``torch.library`` ops (``torch.ops.fastnl``): opcheck on the chunked
engine's and the flash kernel's forward and backward ops (the Triton ones under the interpreter
on a CPU), and ``torch.compile(fullgraph=True)`` through them, alone and in the whole model."""
import pytest
import torch

from fastnl import attention_chunked, ops
from fastnl._paths import import_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _qkv(B, L, D, dtype, seed=0, requires_grad=True):
    """q, k, v [B, L, D] viewing one [B, 3D, L] conv output (strides (3DL, 1, L))."""
    x = torch.randn(B, 3 * D, L, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return [t.transpose(1, 2).detach().requires_grad_(requires_grad) for t in x.chunk(3, dim=1)]


def _chunked_args(dtype, one_tile, rowwise="torch"):
    """One tile holding both clips' scores, P kept; or blocks of 8 rows of one clip, the P of
    the first two of the six steps kept (keep: 2 * 8 * 24 elements)."""
    q, k, v = _qkv(2, 24, 16, dtype)
    clips, block, keep = (2, 32, 2 * 24 * 24) if one_tile else (1, 8, 2 * 8 * 24)
    return (q, k, v, 0.3, clips, block, rowwise, keep)


CHUNKED_SAMPLES = [(dtype, one_tile) for dtype in (F32, BF16, F64) for one_tile in (True, False)]


def _sample_id(sample):
    dtype, one_tile = sample
    return f"{str(dtype).split('.')[-1]}-{'one_tile' if one_tile else 'blocks'}"


@pytest.mark.parametrize("sample", CHUNKED_SAMPLES, ids=_sample_id)
def test_opcheck_chunked_attention(sample):
    torch.library.opcheck(torch.ops.fastnl.nl_attention_chunked.default, _chunked_args(*sample))


@pytest.mark.parametrize("sample", CHUNKED_SAMPLES, ids=_sample_id)
def test_opcheck_chunked_attention_backward(sample):
    q, k, v, scale, clips, block, rowwise, keep = _chunked_args(*sample)
    out, m, z, kept = torch.ops.fastnl.nl_attention_chunked(q, k, v, scale, clips, block, rowwise, keep)
    assert kept.numel() == keep  # the whole P, or the first two steps' P
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    args = [t.detach() for t in (grad, q, k, v, out, m, z)] + [kept.detach() if kept.numel() else None]
    torch.library.opcheck(torch.ops.fastnl.nl_attention_chunked_backward.default,
                          (*args, scale, clips, block, rowwise))


def test_chunked_op_returns_what_the_backward_reads_and_hides_it():
    """The forward op's extra outputs are what the backward reads: with the PyTorch row ops,
    the kept P and no row statistics (the backward recomputes P with the forward's softmax);
    the public function returns O only, equal to the op's O."""
    q, k, v = _qkv(2, 24, 16, F64)
    out, m, z, kept = torch.ops.fastnl.nl_attention_chunked(q, k, v, 0.3, 2, 32, "torch", 2 * 24 * 24)
    scores = 0.3 * q @ k.transpose(1, 2)
    assert m.numel() == 0 and z.numel() == 0 and m.dtype == z.dtype == F64
    # float64 throughout: a few roundings of the same products in another order
    torch.testing.assert_close(kept.view(2, 24, 24), torch.softmax(scores, -1), rtol=1e-13, atol=1e-13)
    public = attention_chunked.nl_attention_chunked(q, k, v, 0.3, block=32, clips=2)
    assert isinstance(public, torch.Tensor)
    torch.testing.assert_close(public, out, rtol=0, atol=0)
    assert public.requires_grad and not (m.requires_grad or z.requires_grad or kept.requires_grad)


@pytest.mark.triton
def test_chunked_op_with_triton_rows_saves_the_row_statistics():
    """The Triton row kernels save the row maximum M of the scores (the scale's sign applied)
    and the sum Z of exp2((S - M) * scale * log2(e)) for every row, blocks of 8 rows."""
    import math

    q, k, v = _qkv(2, 24, 16, F32)
    out, m, z, kept = torch.ops.fastnl.nl_attention_chunked(q, k, v, 0.3, 1, 8, "triton", 0)
    assert kept.numel() == 0 and m.shape == z.shape == (2, 24) and m.dtype == z.dtype == F32
    scores = q.double() @ k.double().transpose(1, 2)
    torch.testing.assert_close(m.double(), scores.amax(-1), rtol=1e-6, atol=1e-6)
    exponents = 0.3 * math.log2(math.e) * (scores - m.double().unsqueeze(-1))
    torch.testing.assert_close(z.double(), exponents.exp2().sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("sample", [(F32, False), (BF16, True)], ids=_sample_id)
def test_opcheck_chunked_attention_triton_rows(sample):
    torch.library.opcheck(torch.ops.fastnl.nl_attention_chunked.default, _chunked_args(*sample, "triton"))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_opcheck_triton_attention(dtype):
    import_kernels()  # defines the ops
    q, k, v = _qkv(2, 20, 16, dtype)
    torch.library.opcheck(torch.ops.fastnl.nl_attention_triton.default, (q, k, v, 0.3))
    out, mz = torch.ops.fastnl.nl_attention_triton(q, k, v, 0.3)
    assert mz.shape == (2, 2, 20) and mz.dtype == F32 and not mz.requires_grad
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    torch.library.opcheck(torch.ops.fastnl.nl_attention_triton_backward.default,
                          (grad, *(t.detach() for t in (q, k, v, out, mz)), 0.3))


def _compiled_matches_eager(backend, dtype, op, **tol):
    """Compile ``ops.nl_attention(backend=backend)`` in one graph, which must call ``op``, and
    compare out and the gradients with eager."""
    q, k, v = _qkv(2, 24, 16, dtype)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    targets = []

    def record(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def fn(a, b, c):
        return ops.nl_attention(a, b, c, scale=0.3, backend=backend)

    compiled = torch.compile(fn, backend=record, fullgraph=True)
    results = []
    for f in (fn, compiled):
        out = f(q, k, v)
        results.append([out.detach(), *torch.autograd.grad(out, (q, k, v), grad)])
    assert op in targets
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        torch.testing.assert_close(got, want, msg=name, **tol)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_chunked_attention_compiles_fullgraph_and_matches_eager(backend):
    """The op is opaque to compile: the compiled graph calls the same kernels, bit for bit."""
    _compiled_matches_eager(backend, F32, torch.ops.fastnl.nl_attention_chunked.default, rtol=0, atol=0)


def test_compiled_attention_ignores_an_enclosing_autocast_like_eager():
    """Under autocast the engines still multiply the input dtype and return it, compiled too."""
    q, k, v = _qkv(2, 24, 16, F32)

    def fn(a, b, c):
        with torch.autocast(DEVICE.type, dtype=BF16):
            return ops.nl_attention(a, b, c, scale=0.3, backend="torch")

    eager = fn(q, k, v)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
    assert eager.dtype == compiled.dtype == F32
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(eager, ops.nl_attention(q, k, v, scale=0.3, backend="torch"), rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_triton_attention_compiles_fullgraph_and_matches_eager(backend):
    import_kernels()  # defines the flash kernel's ops
    op = {"triton": torch.ops.fastnl.nl_attention_triton.default,
          "chunked": torch.ops.fastnl.nl_attention_chunked.default}[backend]
    _compiled_matches_eager(backend, F32, op, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_fused_model_trains_a_step_like_eager():
    """``torch.compile(build_model(impl="fused"), fullgraph=True)`` (inductor; on a CPU the NLAM
    runs the chunked engine's op and the channel extension's op) trains one SGD step on 2 clips
    like the eager model, in float64 with the tolerances of the fused-vs-reference test of
    tests/test_model.py: the compiled graph sums in another order, nothing else."""
    import copy

    from test_model import _clips, _wake_nlams

    from fastnl.model import build_model

    torch.manual_seed(0)
    eager = build_model(4, frames=2, impl="fused").double().train()
    _wake_nlams(eager)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    clips = _clips(2, 2, seed=1).double()
    results = []
    for net, params in ((eager, eager), (compiled, model)):
        optimizer = torch.optim.SGD(params.parameters(), lr=0.1)
        logits, desc = net(clips)
        (logits.sum() + desc.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in params.named_parameters()}
        optimizer.step()
        results.append((logits.detach(), desc.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-9, atol=1e-9)
    ref_grads = results[0][2]

    def group_scale(name):
        owner = name.rsplit(".", 2)[0]
        return max(g.abs().max().item() for n, g in ref_grads.items() if n.startswith(owner + "."))

    for name, grad in results[1][2].items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-7, atol=1e-10 * group_scale(name), msg=name)
    after = dict(model.named_parameters())
    for name, p in eager.named_parameters():  # the step: p - 0.1 grad on both
        torch.testing.assert_close(after[name], p, rtol=1e-9, atol=1e-11 * group_scale(name), msg=name)
    for (name, b), b2 in zip(eager.named_buffers(), model.buffers()):  # BatchNorm statistics
        torch.testing.assert_close(b2, b, rtol=1e-9, atol=1e-12, msg=name)
