"""`fastnl eval` and `fastnl extract` rebuild the network a checkpoint's saved config describes."""
import pytest
import torch

from fastnl.checkpoint import save_checkpoint
from fastnl.errors import UserError
from fastnl.evaluation import model_from_checkpoint
from fastnl.model import build_model
from fastnl.train import TrainConfig

# none of these is a default: NLAM after block 3 only, plain temporal average, r = 8, scale 0.5
SAVED = dict(frames=4, height=64, width=32, nlam_blocks=(3,), temporal="avg", nlam_reduction=8, nlam_scale=0.5,
             impl="reference")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(5, **TrainConfig(**SAVED).model_options(), verbose=False)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised NLAM output BN would hide a wrong scale
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint({"model": model.state_dict(), "num_classes": 5,
                            "config": TrainConfig(**SAVED).to_dict()}, tmp_path / "checkpoint.pt")
    return path, model.eval()


def test_the_saved_config_is_the_network_rebuilt(checkpoint):
    path, trained = checkpoint
    model, cfg = model_from_checkpoint(path)
    assert sorted(model.nlam) == ["3"] and model.classifier.out_features == 5
    assert type(model.temporal) is type(trained.temporal) and type(model.temporal).__name__ != "NLTP"
    nlam = model.nlam["3"]
    assert nlam.scale == 0.5 and (nlam.attention_backend, nlam.channel_backend) == ("plain", "reference")
    assert [p.shape for p in nlam.parameters()] == [p.shape for p in trained.nlam["3"].parameters()]
    assert (cfg["frames"], cfg["height"], cfg["width"], cfg["lr"]) == (4, 64, 32, 1e-4)  # unsaved: defaults
    clips = torch.randn(2, 3, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(clips), trained(clips), rtol=0, atol=0)


def test_impl_override_and_a_config_that_cannot_be_a_network(checkpoint, tmp_path):
    path, _ = checkpoint
    model, cfg = model_from_checkpoint(path, impl="fused")
    assert cfg["impl"] == "fused" and model.nlam["3"].attention_backend == "auto"
    with pytest.raises(UserError, match="--impl must be one of fused, reference, got 'cuda'"):
        model_from_checkpoint(path, impl="cuda")
    state = torch.load(path, weights_only=True)
    state["config"]["temporal"] = "lstm"
    bad = save_checkpoint(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"checkpoint .*bad.pt: its config: temporal must be one of nltp, avg, got 'lstm'"):
        model_from_checkpoint(bad)
    state["config"] = {**TrainConfig(**SAVED).to_dict(), "nlam_reduction": 4}  # weights of r = 8
    wrong = save_checkpoint(state, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"checkpoint .*wrong.pt does not match the network it describes"):
        model_from_checkpoint(wrong)
