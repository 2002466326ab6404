"""pytest-benchmark of the channel attention (paper eq. 3), extension vs reference, small shapes.

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


def test_run_quick_gives_consistent_records():
    """One record per shape, dtype, pass and backend; each extension record's speed-up is over
    the reference record of its own shape, dtype and pass; the backward adds its traffic."""
    records = channel.run(DEVICE, quick=True)
    dtypes = 2 if DEVICE == "cuda" else 1
    assert len(records) == len(channel.QUICK_SHAPES) * dtypes * 2 * 2
    key = lambda r: (tuple(r["shape"]), r["dtype"], r["pass"], r["backend"])  # noqa: E731
    by_key = {key(r): r for r in records}
    assert len(by_key) == len(records)
    for r in records:
        assert r["p20_ms"] <= r["ms"] <= r["p80_ms"]
        shape, dtype, pass_, backend = key(r)
        reference = by_key[(shape, dtype, pass_, "reference")]
        assert r["speedup_vs_reference"] == pytest.approx(reference["ms"] / r["ms"])
        if pass_ == "fwd":
            both = by_key[(shape, dtype, "fwd+bwd", backend)]
            assert both["floor_bytes"] == 2.5 * r["floor_bytes"]
    # one copy bandwidth per shape and dtype, shared by its records
    for shape in {tuple(r["shape"]) for r in records}:
        assert len({r["copy_gb_per_s"] for r in records if tuple(r["shape"]) == shape and r["dtype"] == "float32"}) == 1
