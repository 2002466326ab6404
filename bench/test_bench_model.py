"""pytest-benchmark of the whole NLAM block and of a training step, fused vs reference, through the
step functions ``fastnl bench`` times (small shapes; the full tables come from ``fastnl bench``)."""
import pytest
import torch

from fastnl.benchmarks.model import Case, model_step, nlam_step

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMP = "bf16" if DEVICE == "cuda" else "off"


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_nlam_forward_backward(benchmark, impl):
    frames = 8 if DEVICE == "cuda" else 4
    case = Case("nlam", "layer3", 2, frames, 16, 8, channels=1024 if DEVICE == "cuda" else 256, amp=AMP)
    step = nlam_step(case, impl, DEVICE)
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize() if DEVICE == "cuda" else None),
                       rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_training_step(benchmark, impl):
    case = (Case("model", "step", 8, 8, 256, 128, amp=AMP) if DEVICE == "cuda"
            else Case("model", "step", 2, 2, 64, 32))
    step = model_step(case, impl, DEVICE)
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize() if DEVICE == "cuda" else None),
                       rounds=3, iterations=1, warmup_rounds=1)
