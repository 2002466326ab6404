"""The fused model's SE bottleneck: the lean SE squeeze (``spatial_mean``) and what it saves."""
import pytest
import torch
from timm.models.resnet import Bottleneck

from fastnl.benchmarks.step_cost import Roofline
from fastnl.model import se_bottleneck


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_spatial_mean_is_torch_mean_to_the_bit_with_a_broadcast_gradient(dtype, layout):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 3, dtype=dtype).contiguous(memory_format=layout)  # H*W = 21: divisions round
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = se_bottleneck.spatial_mean(xa), xb.mean((2, 3), keepdim=True)
    assert out.dtype == dtype and torch.equal(out, expected)
    grad = torch.randn_like(expected)
    (got,) = torch.autograd.grad(out, xa, grad)
    (want,) = torch.autograd.grad(expected, xb, grad)
    assert got.shape == x.shape and got.dtype == dtype and torch.equal(got, want)
    # a broadcast view of the [3, 5, 1, 1] quotient, not a full-size tensor
    assert got.stride()[2:] == (0, 0) and got.untyped_storage().nbytes() == grad.numel() * grad.element_size()


def test_spatial_mean_names_a_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*\(2, 3, 4\)"):
        se_bottleneck.spatial_mean(torch.zeros(2, 3, 4))


def _bytes_moved(block, x) -> int:
    block.zero_grad(set_to_none=True)  # no accumulation into .grad from an earlier call
    x = x.clone().requires_grad_()
    with Roofline() as roof:
        out = block(x)
        out.backward(torch.ones_like(out))
    return roof.bytes


def test_the_squeeze_gradient_costs_two_passes_of_the_map_less(monkeypatch):
    """One block's forward and backward, priced op by op: with torch's mean, the squeeze's
    gradient is written out at full size, then added to the tail op's (1 + 3 passes of the
    block's output); with ``spatial_mean`` it is added as a broadcast (2 passes)."""
    torch.manual_seed(0)
    block = Bottleneck(256, 64, attn_layer="se")
    assert se_bottleneck.fuse_se_tails(block) == 1 and type(block) is se_bottleneck.FusedSEBottleneck
    x = torch.randn(2, 256, 16, 8)
    lean = _bytes_moved(block, x)
    monkeypatch.setattr(se_bottleneck, "spatial_mean", lambda t: t.mean((2, 3), keepdim=True))
    plain = _bytes_moved(block, x)
    map_bytes = x.numel() * x.element_size()  # the block's output has the input's shape
    assert 1.95 * map_bytes <= plain - lean <= 2.05 * map_bytes
