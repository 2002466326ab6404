"""The whole network: every configuration of the paper's Tables 3-6, gradients, impl parity,
parameter count, pretrained weights."""
import pytest
import torch

from fastnl.errors import UserError
from fastnl.model import BLOCK_CHANNELS, build_model
from fastnl.model.network import seresnet50

H, W = 64, 32  # small frames keep the CPU tests fast; every stage still has >= 1 position


def _clips(b, n, seed=0):
    return torch.randn(b, n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _wake_nlams(model, seed=0):
    """Give the zero-initialised BatchNorms non-zero weights (after W0 / W in the NLAM and NLTP,
    and timm's last BatchNorm of each residual branch), so every path contributes to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.any():
                module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [(1,), (2,), (3,), (4,), (5,), (3, 4), (3, 5), (4, 5), (3, 4, 5)])
def test_nlam_locations_tables_3_and_4(blocks):
    torch.manual_seed(0)
    model = build_model(5, frames=2, nlam_blocks=blocks, impl="fused")
    assert sorted(int(k) for k in model.nlam) == sorted(blocks)
    for b in blocks:
        assert model.nlam[str(b)].channels == BLOCK_CHANNELS[b]
        assert model.nlam[str(b)].inter_channels == BLOCK_CHANNELS[b] // 2
        assert model.nlam[str(b)].mlp_w1.weight.shape == (BLOCK_CHANNELS[b] // 16, BLOCK_CHANNELS[b])
    logits, desc = model(_clips(2, 2))
    assert logits.shape == (2, 5) and desc.shape == (2, 2048)
    assert torch.isfinite(desc).all()


@pytest.mark.slow
@pytest.mark.parametrize("temporal", ["nltp", "avg"])
@pytest.mark.parametrize("frames", [2, 4, 8])
def test_temporal_aggregation_and_sequence_length_tables_5_and_6(temporal, frames):
    torch.manual_seed(0)
    model = build_model(3, frames=frames, temporal=temporal).eval()
    with torch.no_grad():
        desc = model(_clips(1, frames))
    assert desc.shape == (1, 2048)
    assert (temporal == "nltp") == any(n.startswith("temporal.theta") for n, _ in model.named_parameters())


@pytest.mark.slow
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(4, frames=2, nlam_blocks=(3, 4, 5))
    _wake_nlams(model)
    logits, desc = model(_clips(2, 2))
    (logits.square().sum() + desc.square().sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.slow
@pytest.mark.parametrize("temporal", ["nltp", "avg"])
def test_fused_and_reference_agree_on_the_same_weights(temporal):
    torch.manual_seed(0)
    fused = build_model(6, frames=2, impl="fused", temporal=temporal).double()
    reference = build_model(6, frames=2, impl="reference", temporal=temporal).double()
    assert list(fused.state_dict()) == list(reference.state_dict())
    _wake_nlams(fused)
    reference.load_state_dict(fused.state_dict())
    clips = _clips(2, 2, seed=1).double()
    outs = []
    for model in (fused, reference):
        logits, desc = model(clips)
        (logits.sum() + desc.square().sum()).backward()
        outs.append((logits, desc, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-9)
    ref_grads = outs[1][2]

    def group_scale(name):
        """Largest gradient among the parameters of the module that owns ``name``: some
        gradients are exactly zero in exact arithmetic (e.g. the bias of d, whose constant
        the BatchNorm after W0 removes) and are float64 rounding noise on that scale."""
        owner = name.rsplit(".", 2)[0]
        return max(g.abs().max().item() for n, g in ref_grads.items() if n.startswith(owner + "."))

    for name, grad in outs[0][2].items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-7, atol=1e-10 * group_scale(name), msg=name)


def test_backbone_parameter_count_equals_timm_seresnet50():
    import timm

    timm_model = timm.create_model("seresnet50", pretrained=False)
    expected = sum(p.numel() for n, p in timm_model.named_parameters() if not n.startswith("fc."))
    model = build_model(10, nlam_blocks=())
    assert sum(p.numel() for p in model.backbone.parameters()) == expected
    assert expected == 26_039_024


def test_eval_mode_returns_descriptors_and_bad_input_is_named():
    model = build_model(3, frames=2).eval()
    with torch.no_grad():
        assert model(_clips(1, 2)).shape == (1, 2048)
    with pytest.raises(ValueError, match=r"\[B, N, 3, H, W\]"):
        model(torch.randn(2, 3, H, W))
    with pytest.raises(ValueError, match="subset of 1..5"):
        build_model(3, nlam_blocks=(6,))
    with pytest.raises(ValueError, match="temporal"):
        build_model(3, temporal="lstm")
    with pytest.raises(ValueError, match="impl"):
        build_model(3, impl="cuda")


@pytest.mark.slow
def test_pretrained_timm_and_torchvision_style_files(tmp_path, capsys):
    torch.manual_seed(1)
    source = seresnet50()
    state = source.state_dict()
    timm_file = tmp_path / "timm.pth"
    torch.save(state, timm_file)
    model = build_model(3, pretrained=timm_file)
    for key, value in state.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert "0 missing keys" in capsys.readouterr().out

    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    wrapped["state_dict"]["module.fc.weight"] = torch.zeros(1000, 2048)
    del wrapped["state_dict"]["module.conv1.weight"]
    tv_file = tmp_path / "tv.pth"
    torch.save(wrapped, tv_file)
    model = build_model(3, pretrained=tv_file)
    assert "1 missing keys ['conv1.weight']" in capsys.readouterr().out
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model(3, pretrained=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        build_model(3, pretrained=bad)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="share no key"):
        build_model(3, pretrained=other)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(UserError, match="conv1.weight"):
        build_model(3, pretrained=wrong)


def _saved_bytes_and_grads(model, clips):
    """Bytes of the activations autograd keeps for backward (parameters excluded, and the
    non-local blocks' stacked projection weights, a copy of parameters), and grads."""
    saved = []
    param_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stacked = {(3 * m.a.out_channels if hasattr(m, "a") else 3 * m.theta.out_channels, m.channels
                if hasattr(m, "channels") else m.theta.in_channels, 1, 1)
               for m in model.modules() if getattr(m, "stacked_projections", False)}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_storage and tuple(t.shape) not in stacked:
            saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, desc = model(clips)
    (logits.sum() + desc.square().sum()).backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_less():
    torch.manual_seed(0)
    model = build_model(4, frames=2).double()
    _wake_nlams(model)
    clips = _clips(2, 2, seed=3).double()
    plain_bytes, plain = _saved_bytes_and_grads(model, clips)
    model.set_grad_checkpointing(True)
    ckpt_bytes, ckpt = _saved_bytes_and_grads(model, clips)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)


@pytest.mark.slow
def test_grad_checkpointing_updates_batchnorm_statistics_once():
    """The recomputation in backward must not move the running statistics a second time."""
    torch.manual_seed(0)
    plain = build_model(4, frames=2).double().train()
    _wake_nlams(plain)
    ckpt = build_model(4, frames=2).double().train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    clips = _clips(2, 2, seed=5).double()
    for model in (plain, ckpt):
        logits, desc = model(clips)
        (logits.sum() + desc.square().sum()).backward()
    buffers = dict(ckpt.named_buffers())
    moved = 0
    for name, value in plain.named_buffers():
        torch.testing.assert_close(buffers[name], value, rtol=1e-12, atol=1e-12, msg=name)
        if name.endswith("num_batches_tracked"):
            assert int(value) == 1, name
        elif name.endswith("running_var"):
            moved += int(not torch.equal(value, torch.ones_like(value)))
    assert moved > 40  # every BatchNorm of the backbone took one update
