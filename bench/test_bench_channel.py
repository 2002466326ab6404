"""pytest-benchmark of the channel attention (paper eq. 3), extension vs reference, small shapes;
on CUDA also the Triton BatchNorm + ReLU op against cuDNN's BatchNorm + ReLU.

Run with ``pytest bench/test_bench_channel.py``; the real-shape figures come from
``python -m fastnl.benchmarks.channel``.
"""
import pytest
import torch

from fastnl import _extension, ops
from fastnl.benchmarks import channel

pytestmark = pytest.mark.skipif(not _extension.available(), reason="fastnl._C extension is not built")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(4, 4, 256, 16, 8), (4, 4, 512, 8, 4)]


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(benchmark, shape, backend):
    x, w1, b1, w2, b2 = channel._inputs(shape, torch.float32, DEVICE, requires_grad=False)

    def fwd():
        out = ops.channel_attention(x, w1, b1, w2, b2, backend=backend)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    out = benchmark(fwd)
    assert out.shape == x.shape


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(benchmark, shape, backend):
    leaves = channel._inputs(shape, torch.float32, DEVICE, requires_grad=True)
    grad_out = torch.ones(shape, device=DEVICE)

    def step():
        grads = torch.autograd.grad(ops.channel_attention(*leaves, backend=backend), leaves, grad_out)
        if grads[0].is_cuda:
            torch.cuda.synchronize()
        return grads

    grads = benchmark(step)
    assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton kernels are timed compiled (interpreted on a CPU)")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_batch_norm_relu_forward_backward(benchmark, backend):
    shape = channel.BN_QUICK_SHAPES[0]
    leaves = channel._bn_inputs(shape, torch.bfloat16, DEVICE, requires_grad=True)
    running = (torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE))
    grad_out = torch.ones(shape, device=DEVICE, dtype=torch.bfloat16)

    def step():
        grads = torch.autograd.grad(channel._bn_call(leaves, backend, running), leaves, grad_out)
        torch.cuda.synchronize()
        return grads

    grads = benchmark(step)
    assert [g.shape for g in grads] == [t.shape for t in leaves]


# forward + backward over forward traffic floor of each op
FLOOR_GROWTH = {"channel_attention": 2.5, "se_residual_relu": 8 / 3, "batch_norm_relu": 2.5}


def test_run_quick_gives_consistent_records():
    """One record per op, shape, dtype, pass and backend; each record's speed-up is over the
    plain record of its own op, shape, dtype and pass; the backward adds its traffic."""
    records = channel.run(DEVICE, quick=True)
    dtypes = 2 if DEVICE == "cuda" else 1
    shapes = len(channel.QUICK_SHAPES) + len(channel.SE_QUICK_SHAPES) + \
        (len(channel.BN_QUICK_SHAPES) if DEVICE == "cuda" else 0)
    assert len(records) == shapes * dtypes * 2 * 2
    key = lambda r: (r["op"], tuple(r["shape"]), r["dtype"], r["pass"], r["backend"])  # noqa: E731
    by_key = {key(r): r for r in records}
    assert len(by_key) == len(records)
    for r in records:
        assert r["p20_ms"] <= r["ms"] <= r["p80_ms"]
        op, shape, dtype, pass_, backend = key(r)
        reference = by_key[(op, shape, dtype, pass_, "reference")]
        assert r["speedup_vs_reference"] == pytest.approx(reference["ms"] / r["ms"])
        if pass_ == "fwd":
            both = by_key[(op, shape, dtype, "fwd+bwd", backend)]
            assert both["floor_bytes"] == pytest.approx(FLOOR_GROWTH[op] * r["floor_bytes"])
    # one copy bandwidth per op, shape and dtype, shared by its records
    for op, shape in {(r["op"], tuple(r["shape"])) for r in records}:
        assert len({r["copy_gb_per_s"] for r in records
                    if (r["op"], tuple(r["shape"])) == (op, shape) and r["dtype"] == "float32"}) == 1
