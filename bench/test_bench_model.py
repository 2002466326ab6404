"""pytest-benchmark of the whole NLAM block and of a training step, fused vs reference, through the
step functions ``fastnl bench`` times (small shapes; the full tables come from ``fastnl bench``).
Each benchmark also checks that what it timed is the work it names: every parameter gets a
finite gradient in every timed NLAM step, and every training step moves the first and the last
weights."""
import pytest
import torch

from fastnl import model as model_module
from fastnl.benchmarks.model import Case, model_step, nlam_step

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMP = "bf16" if DEVICE == "cuda" else "off"
ROUNDS, WARMUP = 3, 1  # (--benchmark-disable: one call each)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _capture(monkeypatch, name):
    """Patch ``fastnl.model.<name>`` so that the module the step builds is recorded."""
    built, real = [], getattr(model_module, name)

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(model_module, name, build)
    return built


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_nlam_forward_backward(benchmark, monkeypatch, impl):
    frames = 8 if DEVICE == "cuda" else 4
    case = Case("nlam", "layer3", 2, frames, 16, 8, channels=1024 if DEVICE == "cuda" else 256, amp=AMP)
    built = _capture(monkeypatch, "NLAM")
    step = nlam_step(case, impl, DEVICE)
    (module,) = built
    grads = []
    for p in module.parameters():
        p.register_hook(lambda g: grads.append(bool(torch.isfinite(g).all())))
    calls = []
    benchmark.pedantic(lambda: (step(), _sync(), calls.append(1)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=WARMUP)
    assert calls and len(grads) == len(calls) * len(list(module.parameters())) and all(grads)
    assert all(p.grad is None for p in module.parameters())  # the step leaves no gradient behind


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_training_step(benchmark, monkeypatch, impl):
    case = (Case("model", "step", 8, 8, 256, 128, amp=AMP) if DEVICE == "cuda"
            else Case("model", "step", 2, 2, 64, 32))
    built = _capture(monkeypatch, "build_model")
    step = model_step(case, impl, DEVICE)
    (net,) = built
    weights = [p.detach().clone() for p in net.parameters()]
    moved = []

    def timed():
        before = next(net.parameters()).detach().clone()
        step()
        _sync()
        moved.append(not torch.equal(before, next(net.parameters())))

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    assert moved and all(moved)  # Adam moved the first weight in every step
    assert all(torch.isfinite(p).all() for p in net.parameters())
    last = list(net.parameters())[-1]
    assert not torch.equal(weights[-1], last)  # and the classifier's: the backward ran through the network
