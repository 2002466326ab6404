"""pytest-benchmark of the NLAM attention on CPU (small shapes): the chunked torch path against
the reference, forward+backward, through the functions ``fastnl bench`` calls."""
import pytest
import torch

from fastnl.benchmarks import attention

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("L", [256, 1024])
def test_attention_forward_backward_cpu(benchmark, backend, L):
    result = benchmark.pedantic(attention.time_attention,
                                args=(attention._attention_fn(backend), 1, L, 128, torch.float32,
                                      torch.device("cpu"), 1),
                                rounds=3, iterations=1)
    assert result["fwd_s"] > 0 and result["fwd_bwd_s"] > 0
    assert result["fwd_bwd_tflops"] > 0


def test_run_quick_cpu_reports_both_backends():
    rows = attention.run("cpu", quick=True)
    assert {(r["backend"], r["L"]) for r in rows} == {(b, L) for b in ("torch", "reference") for L in (256, 1024)}
    assert all("refused" not in r and r["fwd_bwd_s"] > 0 for r in rows)
