"""Autocast's weight casts made per module group (fastnl._weight_cast): the same bits as
autocast's own casts, forward and backward, in a few kernels instead of one per tensor."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastnl._weight_cast import call_with, cast_group, cast_targets, subgroup
from fastnl.model import build_model
from fastnl.model.nlam import NLAM

H, W = 64, 32


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (name -> calls), and the casts of parameters."""

    def __init__(self, params):
        super().__init__()
        self.counts, self.param_casts = {}, 0
        self.params = {p.data_ptr() for p in params}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        if name == "_to_copy" and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.params:
            self.param_casts += 1
        return func(*args, **(kwargs or {}))


def test_targets_are_the_conv_and_linear_tensors_autocast_casts():
    nlam = NLAM(64, reduction=16)
    names = [name for name, _ in cast_targets(nlam, torch.bfloat16)]
    # the channel attention's MLP runs without autocast; BatchNorm is not cast
    assert names == ["a.weight", "a.bias", "b.weight", "d.weight", "d.bias", "w0.weight"]
    assert cast_targets(nlam.double(), torch.bfloat16) == []  # float64 stays (autocast's rule)
    assert [n for n, _ in cast_targets(nn.Linear(3, 2).to(torch.bfloat16), torch.bfloat16)] == []
    with pytest.raises(ValueError, match="reduced floating dtype"):
        cast_group(nlam, torch.int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_cast_gives_autocast_bits_forward_and_backward(dtype):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 5, 3), nn.Conv2d(5, 3, 1), nn.Linear(4, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3)
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    casts = cast_group(model, dtype)
    assert list(casts) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    grads_out = {}
    for name, p in model.named_parameters():
        assert torch.equal(casts[name], p.to(dtype)) and casts[name].dtype == dtype
        assert casts[name].stride() == p.stride()  # the layout kept (channels_last weight too)
        grads_out[name] = torch.randn(p.shape, generator=gen).to(dtype)
    # the bias of the 1x1 conv gets no gradient; the rest get theirs cast back
    names = [n for n in casts if n != "1.bias"]
    torch.autograd.backward([casts[n] for n in names], [grads_out[n] for n in names])
    for name, p in model.named_parameters():
        if name == "1.bias":
            assert p.grad is None
            continue
        assert p.grad.dtype == torch.float32 and p.grad.stride() == p.stride()
        assert torch.equal(p.grad, grads_out[name].float())
    assert subgroup(casts, "1") == {"weight": casts["1.weight"], "bias": casts["1.bias"]}


def test_frozen_tensors_get_no_gradient():
    conv = nn.Conv2d(3, 2, 1)
    conv.bias.requires_grad_(False)
    casts = cast_group(conv, torch.bfloat16)
    (casts["weight"].sum() + casts["bias"].sum()).backward()
    assert conv.bias.grad is None and torch.equal(conv.weight.grad, torch.ones_like(conv.weight))


def test_call_with_swaps_and_restores():
    conv = nn.Conv2d(3, 2, 1)
    x = torch.randn(1, 3, 2, 2)
    casts = cast_group(conv, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_with(conv, casts, x)
        expected = conv(x)
    assert torch.equal(out, expected)
    assert isinstance(conv.weight, nn.Parameter) and conv.weight.dtype == torch.float32
    assert torch.equal(call_with(conv, {}, x), conv(x))


def _wake(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.any():
                module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_step_is_bit_identical_with_grouped_casts(checkpointing):
    """One bf16 autocast training step of the fused model: loss, every gradient and the BatchNorm
    statistics the same to the bit with the grouped casts as with autocast's own, with no
    parameter cast by autocast and two grouped casts (forward, backward) per module group."""
    torch.manual_seed(0)
    model = build_model(5, frames=2, impl="fused")
    _wake(model)
    model.set_grad_checkpointing(checkpointing)
    clips = torch.randn(2, 2, 3, H, W, generator=torch.Generator().manual_seed(1))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for grouped in (False, True):
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)
        model.grouped_weight_casts = grouped
        counter = _OpCounter(model.parameters())
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            logits, desc = model(clips)
            loss = logits.float().logsumexp(1).sum() + desc.float().square().mean()
        with counter:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}, counter))
    (loss0, grads0, state0, plain), (loss1, grads1, state1, grouped) = results
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    groups = 5 + len(model.nlam) + 2  # the stem, four stages, the NLAMs, temporal, classifier
    cast_tensors = len(cast_targets(model, torch.bfloat16))
    assert cast_tensors > 100
    # the NLAMs' and NLTP's stacked projections cast their concatenated weights, not each one
    stacked = sum(1 for name, _ in cast_targets(model, torch.bfloat16)
                  if name.split(".")[-2] in ("a", "b", "d", "theta", "phi", "g") and name.startswith(("nlam.", "temporal.")))
    assert stacked == 2 * 5 + 6
    assert plain.param_casts >= cast_tensors - stacked and plain.counts.get("_foreach_copy_", 0) == 0
    assert grouped.param_casts == 0
    assert grouped.counts["_foreach_copy_"] == 2 * groups
    for name, p in model.named_parameters():
        assert type(p) is nn.Parameter and p.grad.stride() == p.stride(), name


@pytest.mark.gpu
def test_on_cuda_a_stage_casts_in_one_kernel_each_way():
    """On CUDA ``_foreach_copy_`` casts a whole stage (layer3: 43 tensors, float32 to bf16) in
    one kernel, and its gradients back in one: the fast path, not a copy per tensor."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    stage = build_model(5, frames=2, impl="fused").backbone.layer3.cuda()
    targets = cast_targets(stage, torch.bfloat16)
    assert len(targets) == 43
    grads = [torch.randn(t.shape, device="cuda").to(torch.bfloat16) for _, t in targets]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        casts = cast_group(stage, torch.bfloat16)
        torch.cuda.synchronize()
    forward_kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(forward_kernels) == 1, [e.name for e in forward_kernels]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.backward(list(casts.values()), grads)
        torch.cuda.synchronize()
    backward_kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(backward_kernels) == 1, [e.name for e in backward_kernels]
    for (name, t), g in zip(targets, grads):
        assert torch.equal(casts[name], t.to(torch.bfloat16)), name
        assert torch.equal(t.grad, g.float()) and t.grad.stride() == t.stride(), name
