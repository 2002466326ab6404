"""NLAM spatial attention (paper eq. 1): the Triton kernels (compiled on a GPU, under the
interpreter without one) and the chunked torch path, against a float64 reference. Every test
here runs on the GPU where there is one (`pytest -m triton`); the tests marked gpu also check
every configuration the autotuner may pick, and the autotuned path itself.

Tolerances come from the error that plain attention computed in the same dtype (every matmul
rounded to it) makes against float64 on the same inputs.
"""
import math

import pytest
import torch

from fastnl import ops
from fastnl._paths import import_kernels
from fastnl.attention_chunked import nl_attention_chunked

kernels = import_kernels()
nla = kernels.nl_attention
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.triton


def make_qkv(B, L, D, dtype, layout, std=1.0, seed=0):
    """q, k, v [B, L, D] in ``dtype``; "channel_first" views a [B, 3D, L] conv output (strides (3DL, 1, L))."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "channel_first":
        x = torch.randn(B, 3 * D, L, generator=gen) * std
        return [t.transpose(1, 2) for t in x.to(DEVICE, dtype).chunk(3, dim=1)]
    return [(torch.randn(B, L, D, generator=gen) * std).to(DEVICE, dtype) for _ in range(3)]


def naive_attention_grads(q, k, v, grad, scale):
    """[out, dq, dk, dv] of plain attention at the inputs' precision: every matmul takes operands
    rounded to q's dtype (P, dS, dO included) and accumulates in fp32."""
    dt = q.dtype

    def mm(a, b):
        return torch.bmm(a.to(dt).float(), b.to(dt).float())

    qf, kf, vf, do = q.float(), k.float(), v.float(), grad.to(dt).float()
    p = torch.softmax(mm(qf, kf.transpose(1, 2)) * scale, dim=-1)
    out = mm(p, vf)
    ds = p * (mm(do, vf.transpose(1, 2)) - (do * out.to(dt).float()).sum(-1, keepdim=True))
    grads = [out, scale * mm(ds, kf), scale * mm(ds.transpose(1, 2), qf), mm(p.transpose(1, 2), do)]
    return [g.to(dt) for g in grads]


def run(fn, q, k, v, grad):
    q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def check_against_fp64(fn, q, k, v, scale):
    """Compare out, dq, dk, dv of ``fn`` with float64. Allowed: 4x the error of naive attention in
    the same dtype (the kernels reduce in another order) plus the fp32 rounding that any fp32
    accumulation makes: eps32 * (sqrt(D) for a length-D dot product + max |logit| for
    probabilities recomputed from a saved log-sum-exp) * the largest reference value of that
    output or of out (dq is exactly 0 at L=1)."""
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device)
    ref = run(lambda a, b, c: ops.nl_attention(a, b, c, scale=scale, backend="reference"),
              q.double(), k.double(), v.double(), grad)
    naive = naive_attention_grads(q, k, v, grad, scale)
    got = run(fn, q, k, v, grad)
    max_logit = scale * torch.bmm(q.double(), k.double().transpose(1, 2)).abs().max().item()
    floor = torch.finfo(torch.float32).eps * (math.sqrt(q.shape[-1]) + max_logit)
    for name, g, n, r in zip(("out", "dq", "dk", "dv"), got, naive, ref):
        assert g.dtype == q.dtype and g.shape == q.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item()
        naive_err = (n.double() - r).abs().max().item()
        tol = 4 * naive_err + floor * max(r.abs().max().item(), ref[0].abs().max().item())
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (naive {q.dtype} error {naive_err:.3g})"


def triton_fn(scale):
    return lambda q, k, v: ops.nl_attention(q, k, v, scale=scale, backend="triton")


def torch_fn(scale, block=None):
    if block is None:
        return lambda q, k, v: ops.nl_attention(q, k, v, scale=scale, backend="torch")
    return lambda q, k, v: nl_attention_chunked(q, k, v, scale, block)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# A subset of {L: 1, 7, 64, 130} x {D: 16, 48, 64, 512, 1024} x {B: 1, 3} x dtypes x layouts
# that covers every value of each axis; D >= 512 is slow under the interpreter, so short L there.
TRITON_CASES = [
    (1, 1, 16, F32, "channel_first"),
    (3, 7, 48, F16, "contiguous"),
    (3, 64, 64, BF16, "channel_first"),
    (1, 130, 64, F32, "channel_first"),
    (3, 130, 16, BF16, "contiguous"),
    (1, 130, 48, F16, "channel_first"),
    (1, 7, 512, BF16, "channel_first"),
    (3, 1, 512, F32, "contiguous"),
    (1, 70, 512, F16, "channel_first"),
    (1, 7, 1024, BF16, "channel_first"),
]


def _case_id(case):
    B, L, D, dtype, layout = case
    return f"B{B}-L{L}-D{D}-{str(dtype).split('.')[-1]}-{layout}"


@pytest.mark.slow
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_matches_fp64(case):
    B, L, D, dtype, layout = case
    q, k, v = make_qkv(B, L, D, dtype, layout)
    check_against_fp64(triton_fn(1.0 / math.sqrt(D)), q, k, v, 1.0 / math.sqrt(D))


@pytest.mark.parametrize("case", [
    (1, 1, 16, F32, "contiguous"),
    (3, 7, 48, BF16, "channel_first"),
    (1, 64, 64, F16, "channel_first"),
    (3, 130, 512, F32, "channel_first"),
    (1, 130, 1024, BF16, "contiguous"),
], ids=_case_id)
def test_torch_path_matches_fp64(case):
    B, L, D, dtype, layout = case
    q, k, v = make_qkv(B, L, D, dtype, layout)
    check_against_fp64(torch_fn(1.0), q, k, v, 1.0)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_torch_path_blocks_match_fp64(block):
    q, k, v = make_qkv(2, 7, 16, F32, "channel_first")
    check_against_fp64(torch_fn(0.5, block), q, k, v, 0.5)


@pytest.mark.parametrize("fn", [triton_fn(10.0), torch_fn(10.0)], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_extreme_logits_stay_finite_and_accurate(fn, dtype):
    """scale 10 without 1/sqrt(D) and unit-variance inputs: logits of several hundred."""
    q, k, v = make_qkv(2, 64, 64, dtype, "channel_first")
    logits = 10.0 * torch.bmm(q.double(), k.double().transpose(1, 2))
    assert logits.abs().max() > 200
    check_against_fp64(fn, q, k, v, 10.0)


@pytest.mark.parametrize("scale", [0.3, -0.3])
def test_triton_saves_row_maximum_and_sum(scale):
    """M: the row maximum of sign(scale) * s in the scores' units; Z: the sum of
    exp2((sign(scale) * s - M) * |scale| * log2(e)); so the log-sum-exp is |scale| * M + ln Z."""
    q, k, v = make_qkv(2, 70, 48, F32, "channel_first")
    out, mz = nla.nl_attention_fwd(q, k, v, scale)
    scores = torch.bmm(q.double(), k.double().transpose(1, 2))
    logits = scale * scores
    assert mz.shape == (2, 2, 70) and mz.dtype == torch.float32
    torch.testing.assert_close(mz[:, 0].double(), (math.copysign(1.0, scale) * scores).amax(-1), rtol=1e-6, atol=1e-6)
    lse = abs(scale) * mz[:, 0].double() + torch.log(mz[:, 1].double())
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ops.nl_attention(q.double(), k.double(), v.double(), scale=scale,
                                                              backend="reference"), rtol=1e-5, atol=1e-5)


def test_torch_path_gradcheck_fp64():
    q, k, v = [t.double().requires_grad_() for t in make_qkv(2, 5, 3, F32, "channel_first")]
    assert torch.autograd.gradcheck(lambda a, b, c: nl_attention_chunked(a, b, c, 0.7, 2), (q, k, v))


def test_triton_rejects_head_dim_not_multiple_of_16():
    q, k, v = make_qkv(1, 8, 20, F32, "contiguous")
    with pytest.raises(ValueError, match=r"head dimension D.*multiple of 16.*D=20"):
        ops.nl_attention(q, k, v, backend="triton")


def test_triton_rejects_head_dim_above_1024():
    q, k, v = [torch.zeros(1, 2, 1040, device=DEVICE) for _ in range(3)]
    with pytest.raises(ValueError, match=r"at most 1024.*D=1040"):
        nla.nl_attention_triton(q, k, v)


def test_mismatched_shapes_are_rejected():
    q, k, _ = make_qkv(1, 8, 16, F32, "contiguous")
    with pytest.raises(ValueError, match="same shape|must all have shape"):
        ops.nl_attention(q, k[:, :7], k[:, :7], backend="triton")
    with pytest.raises(ValueError, match="one shape"):
        nla.nl_attention_triton(q, k[:, :7], k[:, :7])


def test_triton_on_cpu_outside_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = [t.cpu() for t in make_qkv(1, 8, 16, F32, "contiguous")]
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.nl_attention(q, k, v, backend="triton")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the kernels are compiled on this machine")
def test_autotuning_is_off_under_the_interpreter():
    assert not nla.autotune_enabled()


def test_forced_configs_validate_and_nest():
    first, second = nla.candidate_configs("fwd", 64)[:2]
    with pytest.raises(ValueError, match="fwd, dkdv, dq"):
        nla.forced_configs(bwd=first)
    with nla.forced_configs(fwd=first):
        assert nla._FORCED == {"fwd": first}
        with nla.forced_configs(fwd=second, dq=first):
            assert nla._FORCED == {"fwd": second, "dq": first}
        assert nla._FORCED == {"fwd": first}
    assert nla._FORCED == {}


def _every_config(head_dim, dtype):
    """(kernel, config) for every configuration the autotuner may pick, one kernel at a time."""
    for kernel in ("fwd", "dkdv", "dq"):
        for config in nla.candidate_configs(kernel, head_dim, dtype=dtype):
            yield kernel, config


# The model's head dims in its training dtype, and fp32 (its own tiles); L not a multiple of any
# block, two clips, the conv's channel-first layout.
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, dtype, seq_len", [(128, BF16, 1000), (512, BF16, 1000),
                                                      (1024, BF16, 520), (512, F32, 300)])
def test_every_autotuner_configuration_matches_fp64(head_dim, dtype, seq_len):
    q, k, v = make_qkv(2, seq_len, head_dim, dtype, "channel_first")
    scale = 1.0 / math.sqrt(head_dim)
    for kernel, config in _every_config(head_dim, dtype):
        with nla.forced_configs(**{kernel: config}):
            try:
                check_against_fp64(triton_fn(scale), q, k, v, scale)
            except AssertionError as err:
                raise AssertionError(f"{kernel} {config}: {err}") from err


@pytest.mark.gpu
def test_autotuned_path_matches_fp64(monkeypatch):
    monkeypatch.setenv("FASTNL_AUTOTUNE", "1")
    assert nla.autotune_enabled()
    q, k, v = make_qkv(1, 777, 512, BF16, "channel_first", seed=4)
    check_against_fp64(triton_fn(1.0 / math.sqrt(512)), q, k, v, 1.0 / math.sqrt(512))


@pytest.mark.parametrize("head_dim", [16, 48, 512, 1024])
def test_configurations_cover_the_head_dim(head_dim):
    for kernel in ("fwd", "dkdv", "dq"):
        configs = nla.candidate_configs(kernel, head_dim)
        default = nla.default_config(kernel, head_dim)
        assert any(c.kwargs == default.kwargs and c.num_warps == default.num_warps for c in configs)
        for c in configs:
            width = c.kwargs["BLOCK_DV"]
            assert width & (width - 1) == 0 and width <= max(16, 1 << (head_dim - 1).bit_length())
        assert nla.candidate_configs(kernel, head_dim, seq_len=7), kernel
    assert nla.recompute_factor(head_dim, nla.default_config("fwd", head_dim).kwargs["BLOCK_DV"]) == \
        max(1, head_dim // 256)


def test_keep_drops_row_blocks_longer_than_the_sequence():
    short = nla.candidate_configs("fwd", 512, seq_len=7)
    assert short and all(c.kwargs["BLOCK_M"] <= 64 for c in short)
    assert any(c.kwargs["BLOCK_M"] == 128 for c in nla.candidate_configs("fwd", 512, seq_len=4096))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_triton_fp32_gradients_at_extreme_logits_within_twice_plain(seed):
    """fp32, D=16, logits x10: the backward recomputed P from a saved log-sum-exp and dv reached
    2.3x the plain fp32 error; with the saved row maximum and sum it rounds like the forward."""
    from test_attention_chunked import check_within_twice_plain

    q, k, v = make_qkv(1, 300, 16, F32, "channel_first", seed=seed)
    check_within_twice_plain(triton_fn(2.5), q, k, v, 2.5, seed=seed + 100)


def test_tuned_configs_file_picks_the_nearest_length(tmp_path, monkeypatch):
    """The GPU suite's tuned-configs.json: per kernel, dtype and D the entry at the nearest L; a
    configuration outside the candidates, another D or dtype, or no file: None."""
    fast, slow = nla.candidate_configs("fwd", 512)[1], nla.candidate_configs("fwd", 512)[2]

    def entry(config, L, dtype="bf16", D=512):
        return {"kernel": "fwd", "dtype": dtype, "L": L, "D": D, **config.kwargs,
                "num_warps": config.num_warps, "num_stages": config.num_stages, "ms": 1.0}

    path = tmp_path / "tuned-configs.json"
    bogus = {"kernel": "fwd", "dtype": "bf16", "L": 100, "D": 512, "BLOCK_M": 8, "BLOCK_N": 8, "BLOCK_DV": 8,
             "num_warps": 1, "num_stages": 1}
    path.write_text(__import__("json").dumps({"configs": [entry(fast, 1024), entry(slow, 8192), bogus]}))
    monkeypatch.delenv("FASTNL_TUNED_CONFIGS", raising=False)
    assert nla.tuned_config("fwd", 512, 1024, BF16) is None
    monkeypatch.setenv("FASTNL_TUNED_CONFIGS", str(path))
    assert nla.tuned_config("fwd", 512, 2000, BF16).kwargs == fast.kwargs
    assert nla.tuned_config("fwd", 512, 6000, BF16).kwargs == slow.kwargs
    assert nla.tuned_config("fwd", 512, 90, BF16) is None  # nearest is the bogus entry
    assert nla.tuned_config("fwd", 1024, 1024, BF16) is None and nla.tuned_config("dq", 512, 1024, BF16) is None
    assert nla.tuned_config("fwd", 512, 1024, F32) is None
    monkeypatch.setenv("FASTNL_TUNED_CONFIGS", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json is unusable"):
        nla.tuned_config("fwd", 512, 1024, BF16)


@pytest.mark.parametrize("head_dim, on_chip", [(16, True), (48, True), (128, True), (256, True),
                                               (512, False), (1024, False)])
def test_forward_keeps_q_on_chip_where_one_chunk_covers_the_head_dim(head_dim, on_chip):
    """The default forward keeps its Q tile on chip at D <= 256 (the numerics cases at D = 16, 48
    and 64 run that path, D = 512 and 1024 the sliced one)."""
    config = nla.default_config("fwd", head_dim)
    assert nla.keeps_q_on_chip(head_dim, config.kwargs["BLOCK_DV"]) is on_chip


def test_the_flash_backward_makes_no_zero_gradient_for_m_and_z():
    """Counted by the live-storage tracker: the backward's extra memory is dQ, dK and dV, the
    op's outputs; no zero [B, 2, L] gradient is made for the forward's M and Z (non-differentiable)."""
    from fastnl.benchmarks import memory

    B, L, D = 2, 64, 16
    q, k, v = [t.detach().requires_grad_() for t in make_qkv(B, L, D, torch.float32, "contiguous", seed=3)]
    grad = torch.randn(B, L, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with memory.LiveStorageTracker() as tracker:
        for t in (q, k, v, grad):
            tracker.track(t)
        out = nla.nl_attention_triton(q, k, v, scale=0.25)
        after_forward = tracker.live
        tracker.peak = tracker.live
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        extra = tracker.peak - after_forward
    assert extra == 3 * B * L * D * 4, (extra, 3 * B * L * D * 4)
    assert torch.isfinite(dq).all() and dk.abs().sum() > 0 and dv.abs().sum() > 0
