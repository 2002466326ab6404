"""The fused BatchNorm ops' running statistics and batch counts made when the fused model's
forward ends (``fastnl._running_stats``): the values of the updates made one by one."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from fastnl import ops
from fastnl._running_stats import count_batch, deferred_running_stats, lerp_running

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _one_by_one(running, batches, momenta):
    out = [t.clone() for t in running]
    for i, (b, m) in enumerate(zip(batches, momenta)):
        out[i % len(out)].lerp_(b, m)
    return out


def test_deferred_updates_are_made_on_exit_with_the_same_bits():
    gen = torch.Generator().manual_seed(0)
    running = [torch.randn(5, generator=gen), torch.rand(7, generator=gen) + 0.5]
    batches = [torch.randn(5, generator=gen), torch.rand(7, generator=gen)]
    expected = _one_by_one(running, batches, [0.1, 0.1])
    counter = torch.zeros((), dtype=torch.long)
    with deferred_running_stats():
        lerp_running(running, batches, 0.1)
        count_batch(counter)
        assert int(counter) == 0  # not yet
        assert not torch.equal(running[0], expected[0])
    assert int(counter) == 1
    for got, want in zip(running, expected):
        assert torch.equal(got, want)


def test_a_tensor_updated_twice_takes_the_updates_in_order():
    """Lerps do not commute: the second update of one tensor in a forward comes after the first
    (the first is made when the second is collected), with momenta differing too."""
    gen = torch.Generator().manual_seed(1)
    running = [torch.randn(6, generator=gen)]
    b1, b2 = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    expected = running[0].clone().lerp_(b1, 0.1).lerp_(b2, 0.3)
    wrong = running[0].clone().lerp_(b2, 0.3).lerp_(b1, 0.1)
    assert not torch.equal(expected, wrong)
    counter = torch.zeros((), dtype=torch.long)
    with deferred_running_stats():
        lerp_running(running, [b1], 0.1)
        count_batch(counter)
        lerp_running(running, [b2], 0.3)
        count_batch(counter)
        count_batch(counter, now=True)  # momentum=None reads the count next: made now
        assert int(counter) == 3
    assert int(counter) == 3
    assert torch.equal(running[0], expected)


def test_updates_are_made_when_the_forward_raises_and_nothing_is_deferred_outside():
    running, batch = [torch.zeros(3)], [torch.ones(3)]
    with pytest.raises(RuntimeError, match="boom"):
        with deferred_running_stats():
            lerp_running(running, batch, 0.5)
            raise RuntimeError("boom")
    assert torch.equal(running[0], torch.full((3,), 0.5))
    lerp_running(running, batch, 0.5)
    assert torch.equal(running[0], torch.full((3,), 0.75))
    with deferred_running_stats(enabled=False):
        lerp_running(running, batch, 0.5)
        assert torch.equal(running[0], torch.full((3,), 0.875))


@pytest.mark.triton
def test_batch_norm_relu_op_updates_the_same_inside_and_outside():
    """The Triton op (interpreted on a CPU): its running statistics inside a deferred forward
    are those of an immediate call, to the bit, once the forward ends."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 3, 5, generator=gen).to(DEVICE)
    weight, bias = torch.randn(6, generator=gen).to(DEVICE), torch.randn(6, generator=gen).to(DEVICE)
    results = []
    for deferred in (False, True):
        mean, var = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
        with deferred_running_stats(deferred):
            y = ops.batch_norm_relu(x, mean, var, weight, bias, training=True, momentum=0.1, backend="triton")
            moved = not torch.equal(mean, torch.zeros(6, device=DEVICE))
        results.append((y, mean, var, moved))
    (y0, m0, v0, moved0), (y1, m1, v1, moved1) = results
    assert moved0 and not moved1  # immediate vs made on exit
    assert torch.equal(y0, y1) and torch.equal(m0, m1) and torch.equal(v0, v1)
    assert not torch.equal(m1, torch.zeros(6, device=DEVICE))


def test_fused_step_makes_the_batchnorm_bookkeeping_in_three_launches_not_106():
    """Priced on fake CUDA tensors: with the deferral the fused step's 53 Triton BatchNorms
    update their statistics in two ``_foreach_lerp_`` kernels (106 tensors, 64 per kernel) and
    count their batches in one ``_foreach_add_``, where each launched two: 103 fewer."""
    import fastnl.model
    from fastnl.benchmarks import step_cost
    from fastnl.model import build_model

    def immediate(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.deferred_bn_stats = False
        return model

    case = step_cost.StepCase("tiny", 2, 4, 64, 32)
    deferred = step_cost.price_step(case, "fused", launch_floor=False)
    with mock.patch.object(fastnl.model, "build_model", immediate):
        plain = step_cost.price_step(case, "fused", launch_floor=False)
    model = build_model(10, verbose=False)
    # the stem's, three per bottleneck (bn1, bn2 and the end's bn3) and the 4 downsampling
    # shortcuts' (applied in the end's op)
    triton_bns = 1 + 16 * 3 + 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules()) == triton_bns
    assert plain["launches"] - deferred["launches"] == 2 * triton_bns - 3
    assert deferred["tflops"] == pytest.approx(plain["tflops"], rel=1e-12)
