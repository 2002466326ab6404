"""`fastnl bench memory`: the live-storage counter, the fits, the projection, the real model."""
import argparse

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastnl.benchmarks import memory
from fastnl.errors import UserError

MB = 2.0**20


def test_counter_on_a_linear_layer_gives_exact_bytes():
    with FakeTensorMode(), memory.LiveStorageTracker() as tracker:
        lin = torch.nn.Linear(8, 4)
        tracker.track_module(lin)  # weight 4x8 + bias 4, float32
        x = torch.randn(16, 8)
        base = tracker.live
        assert base == (4 * 8 + 4 + 16 * 8) * 4
        tracker.reset_peak()
        y = torch.relu(lin(x))
        # the linear output (16x4 float32) lives until relu has written its own output, which
        # relu keeps for backward; the linear output is saved by nothing and is freed
        assert tracker.peak - base == 2 * 16 * 4 * 4
        assert tracker.live - base == 16 * 4 * 4
        y.sum().backward()
        del y
        # what is left: the gradients of weight and bias
        assert tracker.live - base == (4 * 8 + 4) * 4
        assert lin.weight.grad is not None


def test_counter_counts_a_storage_once_and_rounds_up():
    with FakeTensorMode(), memory.LiveStorageTracker(round_to=512) as tracker:
        x = torch.empty(3)  # 12 bytes -> one 512-byte block
        views = [x[1:], x.view(3, 1), x.t()]
        assert tracker.live == 512
        del x, views
        assert tracker.live == 0
        y = torch.empty(129, dtype=torch.float32)  # 516 bytes -> two blocks
        assert tracker.live == 1024
        del y


@pytest.mark.parametrize("tile", [None, 1])
def test_counter_on_the_chunked_engine_sees_what_it_saves(monkeypatch, tile):
    """q, k, v (bf16, kept by the caller anyway), O (bf16) and the row statistics M and Z
    (float32 [B, L] each: counted as CUDA's Triton row kernels keep them, whichever row ops the
    CPU call names); plus P (bf16 [B, L, L]) when the whole score matrix fits one tile (the
    default budget at L = 64)."""
    from fastnl import attention_chunked

    if tile is not None:
        monkeypatch.setitem(attention_chunked.TILE_ELEMENTS, "cuda", tile)
    B, L, D = 2, 64, 16
    with memory.cuda_like(), FakeTensorMode(), memory.LiveStorageTracker() as tracker:
        q, k, v = (torch.randn(B, L, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        base = tracker.live
        out = attention_chunked.nl_attention_chunked(q, k, v, 1.0, rowwise="torch")
        kept = tracker.live - base
        expected = B * L * D * 2 + 2 * B * L * 4 + (B * L * L * 2 if tile is None else 0)
        assert kept == expected
        out.float().sum().backward()
        assert q.grad.dtype == torch.bfloat16


def test_fit_recovers_a_b_c_and_extrapolates_exactly():
    a, b, c = 700.0, 38.5, 0.2
    points = [(n, a + b * n + c * n * n) for n in (8, 16, 32, 64, 128, 256)]
    fa, fb, fc = memory.fit_quadratic(points)
    assert (fa, fb, fc) == pytest.approx((a, b, c), rel=1e-9)
    assert memory.extrapolation_error(points) == pytest.approx(0.0, abs=1e-9)
    # a point off the curve shows up as an extrapolation error of the right sign
    off = points[:-1] + [(256, points[-1][1] * 1.1)]
    assert memory.extrapolation_error(off) == pytest.approx(1 / 1.1 - 1, rel=1e-6)
    la, lb = memory.fit_line([(x, 5.0 + 2.0 * x) for x in (8, 16, 32)])
    assert (la, lb) == pytest.approx((5.0, 2.0))


@pytest.mark.parametrize("a,b,c,budget", [(700.0, 38.5, 0.2, 78 * 1024.0), (700.0, 38.5, 0.0, 78 * 1024.0),
                                           (3000.0, 300.0, 1.6, 79872.0), (10.0, 1.0, 1e-9, 50.0)])
def test_projection_is_the_largest_integer_within_the_budget(a, b, c, budget):
    n = memory.largest_within(a, b, c, budget)
    assert a + b * n + c * n * n <= budget < a + b * (n + 1) + c * (n + 1) ** 2
    brute = max(x for x in range(1, 100000) if a + b * x + c * x * x <= budget)
    assert n == brute


def test_projection_edge_cases():
    assert memory.largest_within(100.0, 10.0, 1.0, 50.0) == 0  # not even one fits
    assert memory.largest_within(10.0, 0.0, 0.0, 50.0, limit=999) == 999  # never reaches the budget


@pytest.mark.slow
def test_quick_count_of_the_real_model_separates_quadratic_from_linear(monkeypatch):
    """64x32 input: layer3 maps 4x2 (L = 8N), layer4 maps 2x1 (L = 2N), batch 2, bf16 autocast.
    The reference keeps the float32 softmax and its bf16 copy for the second bmm, 6 L^2 bytes
    per clip per NLAM; the fused model keeps nothing of size L^2. Both keep NLTP's float32
    N x N affinities (4 N^2 bytes per clip). At these tiny L the whole score matrix would fit
    one tile of the chunked engine, which then keeps P for its backward; a tile budget of one
    element makes it run one clip per step (batch 2), as it runs at the model's real lengths."""
    from fastnl import attention_chunked

    monkeypatch.setitem(attention_chunked.TILE_ELEMENTS, "cuda", 1)
    setting = memory.Setting(height=64, width=32, frames=(4, 8, 16), batch=2, frames_at=4, batches=(),
                             grad_checkpoint=(False,), round_to=1)
    rows = memory.run(setting=setting, log=None)
    fits = {f["impl"]: f for f in rows if f["kind"] == "fit"}
    counts = [r for r in rows if r["kind"] == "count"]
    assert len(counts) == 6
    nltp = 4
    expected_ref = setting.batch * (6 * (8**2 + 2**2) + nltp) / MB
    expected_fused = setting.batch * nltp / MB
    assert fits["reference"]["kept_c_mb"] == pytest.approx(expected_ref, rel=1e-6)
    assert fits["fused"]["kept_c_mb"] == pytest.approx(expected_fused, rel=1e-6)
    # the linear part: both keep the backbone's activations and the 1x1-conv outputs, but the
    # fused bottleneck ends (as CUDA runs them) keep no normalised map x (bf16): per frame, sum
    # over the 16 bottlenecks of C 2 H W bytes, with layer1..4 at 16x8, 8x4, 4x2, 2x1 here. (The
    # [N, C] float32 each image's mean of xhat that they keep is as much as the reference keeps
    # per image and channel beyond them; with a float32 copy of the gate, which they no longer
    # keep, the fused ends kept C 4 bytes per frame more.)
    per_frame = sum(blocks * c * 2 * hw for blocks, c, hw in
                    ((3, 256, 128), (4, 512, 32), (6, 1024, 8), (3, 2048, 2)))
    assert fits["fused"]["kept_b_mb"] == pytest.approx(
        fits["reference"]["kept_b_mb"] - setting.batch * per_frame / MB, abs=0.01 * fits["reference"]["kept_b_mb"])
    for r in counts:
        assert r["peak_mb"] >= r["start_mb"] + r["kept_mb"] - 1e-6
    text = memory.format_table(rows)
    assert "reference, batch 2" in text and "projection within" in text


def test_cli_memory_setting_and_errors():
    from fastnl.commands import bench

    ns = argparse.Namespace(quick=False, frames="8,16,32", batches="4,8", batch=4, resolution="128x64",
                            amp="off", budget_mb=40000.0, grad_checkpoint="on", impl="fused")
    s = bench.memory_setting(ns)
    assert (s.frames, s.batches, s.batch, s.height, s.width, s.amp) == ((8, 16, 32), (4, 8), 4, 128, 64, "off")
    assert s.budget_mb == 40000.0 and s.grad_checkpoint == (True,) and s.impls == ("fused",)
    assert "memory" in bench.ALL and "memory" not in bench.DEFAULT_SUITES
    for bad in (dict(frames="8,16"), dict(frames="8,x,16"), dict(resolution="100x50")):
        with pytest.raises(UserError):
            bench.memory_setting(argparse.Namespace(**{**vars(ns), **bad}))


@pytest.mark.slow
def test_fastnl_bench_memory_writes_counts_fits_and_projection(tmp_path, capsys):
    import json

    from fastnl import cli

    out = tmp_path / "memory.json"
    assert cli.main(["bench", "memory", "--quick", "--device", "cpu", "--impl", "fused", "--grad-checkpoint", "off",
                     "--frames", "2,4,8", "--batches", "2,4", "--budget-mb", "4096", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["suites"]["memory"]
    counts = [r for r in rows if r["kind"] == "count"]
    (fit,) = [r for r in rows if r["kind"] == "fit"]
    assert [(r["batch"], r["frames"]) for r in counts] == [(2, 2), (2, 4), (2, 8), (4, 4)]
    assert fit["budget_mb"] == 4096 and fit["max_frames"] > 8 and fit["max_batch"] > 4
    a, b, c = fit["peak_a_mb"], fit["peak_b_mb"], fit["peak_c_mb"]
    n = fit["max_frames"]
    assert a + b * n + c * n * n <= 4096 < a + b * (n + 1) + c * (n + 1) ** 2
    text = capsys.readouterr().out
    assert "fused, batch 2: peak" in text and "max N at batch 2" in text
