"""`fastnl bench step-cost`: the op pricer, the attention stand-in, the whole step."""
import json

from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastnl import reference, runtime
from fastnl.attention_engines import HOPPER, choose, predict_ms
from fastnl.benchmarks import memory, step_cost


def _rates():
    gemm = HOPPER.tensor_tflops * HOPPER.gemm_efficiency * 1e12
    bw = HOPPER.bandwidth_tbs * 1e12
    return gemm, bw


def test_roofline_prices_a_gemm_by_its_flops_and_an_elementwise_op_by_its_bytes():
    gemm, bw = _rates()
    B, M, K, N = 4, 512, 256, 384
    with FakeTensorMode(allow_non_fake_inputs=True):
        a = torch.randn(B, M, K, dtype=torch.bfloat16)
        b = torch.randn(B, K, N, dtype=torch.bfloat16)
        with step_cost.Roofline(launch_floor=False) as roof:
            c = torch.bmm(a, b)
        assert roof.flops == 2 * B * M * K * N
        assert roof.bytes == 2 * (B * M * K + B * K * N + B * M * N)
        assert roof.gemm_s == pytest.approx(max(2 * B * M * K * N / gemm, roof.bytes / bw))
        assert roof.memory_s == 0.0
        x = torch.randn(1000, 300)
        y = torch.randn(1000, 300)
        with step_cost.Roofline(launch_floor=False) as roof:
            x.t().view(300, 1000)  # views: free
            z = x + y  # reads 2, writes 1
            z.add_(y)  # reads z and y, writes z
            w = z * torch.ones(300)  # the broadcast row is read as its 300 elements
        n = 1000 * 300 * 4
        assert roof.ops == 4  # the views cost nothing; ones is a write
        assert roof.per_op["add"][1] == 1 and roof.per_op["add_"][1] == 1
        assert roof.bytes == 3 * n + 3 * n + 300 * 4 + (n + 300 * 4 + n)
        assert roof.memory_s == pytest.approx(roof.bytes / bw)
        assert roof.flops == 0 and w.shape == z.shape and c.shape == (B, M, N)
        # an in-place GEMM into its accumulator (the residual convolution's input gradient): the
        # GEMM's flops; the broadcast batch of the weight read once, the accumulator read and written
        acc = torch.randn(B, M, N, dtype=torch.bfloat16)
        weight = torch.randn(M, K, dtype=torch.bfloat16)
        with step_cost.Roofline(launch_floor=False) as roof:
            acc.baddbmm_(weight.expand(B, M, K), b)
        assert roof.flops == 2 * B * M * K * N and roof.per_op["baddbmm_"][1] == 1
        assert roof.bytes == 2 * (2 * B * M * N + M * K + B * K * N)


def test_every_kernel_takes_at_least_the_launch_floor():
    """A kernel shorter than the GPU's launch_us costs launch_us, a long one its roofline; an op
    of several kernels (``OWN_OP_LAUNCHES``) its long kernels at their roofline, or their floors
    if more, plus a floor for each tiny one."""
    _gemm, bw = _rates()
    floor = HOPPER.launch_us * 1e-6
    with FakeTensorMode(allow_non_fake_inputs=True):
        small, big = torch.randn(256), torch.randn(64, 1024, 1024)
        with step_cost.Roofline() as roof:
            small + small
            big + big
        assert roof.launches == 2 and roof.ops == 2
        # (each storage read once: x + x reads x once and writes the sum)
        assert roof.per_op["add"][0] == pytest.approx(floor + 2 * big.numel() * 4 / bw)
        assert roof.floor_s == pytest.approx(floor - 2 * 256 * 4 / bw)
    roof = step_cost.Roofline()
    # bn_relu: two passes over the map and a finalize over the partials
    roof.add("bn_relu", 0, int(1e6), torch.bfloat16, step_cost.OWN_OP_LAUNCHES[("fastnl", "bn_relu")])
    assert roof.launches == 3 and roof.memory_s == pytest.approx(2 * floor + floor)  # 1 MB: 0.3 us of bandwidth
    roof.add("bn_relu", 0, int(1e9), torch.bfloat16, (3, 1))
    assert roof.memory_s == pytest.approx(3 * floor + 1e9 / bw + floor)


@pytest.mark.parametrize("input_grad,weight_grad", [(True, True), (True, False), (False, True)])
def test_convolution_backward_launches_a_kernel_per_gradient(input_grad, weight_grad):
    """cuDNN makes a convolution's input and weight gradients in separate kernels: a tiny
    convolution's backward costs one launch floor per gradient asked for, and reads the output
    gradient in each."""
    floor = HOPPER.launch_us * 1e-6
    with FakeTensorMode(allow_non_fake_inputs=True):
        conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
        conv.weight.requires_grad_(weight_grad)
        x = torch.randn(2, 8, 6, 5, requires_grad=input_grad)
        y = conv(x)
        grad = torch.ones_like(y)
        with step_cost.Roofline() as roof:
            y.backward(grad)
    kernels = int(input_grad) + int(weight_grad)
    assert roof.per_op["convolution_backward"] == (pytest.approx(kernels * floor), 1)
    assert roof.launches == kernels, roof.per_op
    # each kernel reads grad_output; the input gradient's the weight, the weight gradient's the
    # input; each writes its gradient
    dy, xb, wb = (t.numel() * 4 for t in (y, x, conv.weight))
    expected = kernels * dy + (wb + xb if input_grad else 0) + (xb + wb if weight_grad else 0)
    assert roof.bytes == expected


@pytest.mark.parametrize("B,L,D", [(8, 1024, 512), (32, 1024, 512), (8, 8192, 512), (8, 2048, 1024)])
def test_op_pricer_and_attention_cost_model_agree_on_plain_attention(B, L, D):
    """Two independent estimates of the plain bf16 attention (bmm, softmax, bmm under CUDA's
    autocast policy, forward and backward): the op pricer from the ops autograd runs, the cost
    model from its own pass count. They must agree within 25% (launch overheads, which only the
    cost model has, taken out), else one of them misprices the baseline of every speed-up."""
    with memory.cuda_like(), FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = (torch.randn(B, D, L, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(B, L, D, dtype=torch.bfloat16)
        with step_cost.Roofline(launch_floor=False) as roof:
            with runtime.autocast("cpu", torch.bfloat16):
                out = reference.nl_attention_plain(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   D ** -0.5)
            out.backward(grad)
    predicted = predict_ms("plain", "bf16", B, L, D)["fwd_bwd_ms"] - 15 * HOPPER.launch_us * 1e-3
    priced = 1e3 * roof.total_s
    assert roof.per_op["bmm"][1] == 6  # S, O; dV, dP, dQ, dK
    assert abs(priced / predicted - 1) < 0.25, (priced, predicted)


def test_stand_in_records_each_call_and_prices_it_by_the_cost_model():
    calls = step_cost.AttentionCalls(HOPPER)
    B, L, D = 2, 96, 32
    from fastnl import ops

    with FakeTensorMode(), step_cost.attention_stand_in(calls):
        q, k, v = (torch.randn(B, D, L, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        out = ops.nl_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="auto")
        assert out.shape == (B, L, D) and out.dtype == torch.bfloat16
        out.sum().backward()
        assert q.grad.shape == q.shape and v.grad.shape == v.shape
    assert ops.nl_attention is not None and ops.nl_attention.__name__ == "nl_attention"  # restored
    engine = choose(torch.bfloat16, D, L, HOPPER.capability)[0]
    assert [(c["engine"], c["part"], c["B"], c["L"], c["D"]) for c in calls.calls] == \
        [(engine, "fwd", B, L, D), (engine, "bwd", B, L, D)]
    pred = predict_ms(engine, "bf16", B, L, D)
    assert calls.ms == pytest.approx(pred["fwd_bwd_ms"])


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_step_prices_both_models_on_the_same_backbone_flops(grad_checkpoint):
    case = step_cost.StepCase("tiny", 2, 4, 64, 32, grad_checkpoint=grad_checkpoint)
    row = step_cost.compare(case, launch_floor=False)  # the rooflines alone
    ref, fused = row["rows"]["reference"], row["rows"]["fused"]
    # two NLAMs (after layer3 and layer4), each a forward and a backward
    assert ref["attention_calls"] == fused["attention_calls"] == 4
    assert ref["engines"] == "plain (L=8, D=1024), plain (L=32, D=512)"
    for impl in (ref, fused):
        assert impl["step_ms"] == pytest.approx(impl["rest_ms"] + impl["attention_ms"])
        assert impl["rest_ms"] == pytest.approx(impl["gemm_ms"] + impl["memory_ms"])
    # the backbone is the same in both: the same convolution flops to within the NLAM's
    # channel attention (the reference's two small MLP matmuls per pool are its only flops)
    assert fused["tflops"] == pytest.approx(ref["tflops"], rel=0.01)
    assert fused["rest_ms"] < ref["rest_ms"]  # the extension reads its input twice, not 6 passes
    assert row["predicted_speedup"] == pytest.approx(ref["step_ms"] / fused["step_ms"])
    assert row["attention_share"] == pytest.approx(ref["attention_ms"] / ref["step_ms"])
    assert row["speedup_if_attention_free"] > row["predicted_speedup"]
    # the fused model's BatchNorms are more, shorter kernels, but its weight casts are made
    # per module group: fewer kernels in all; at these tiny maps nearly every kernel is shorter
    # than the launch floor, and the floors are most of the step
    assert row["reference_launches"] > row["fused_launches"] > 500 and row["fused_floor_ms"] == 0
    floored = step_cost.compare(case)
    assert floored["fused_launches"] == row["fused_launches"]
    assert floored["reference_floor_ms"] > floored["fused_floor_ms"] > 0
    assert floored["fused_ms"] == pytest.approx(row["fused_ms"] + floored["fused_floor_ms"])
    assert floored["fused_floor_ms"] > 0.5 * floored["fused_ms"]
    # checkpointing recomputes the backbone's forward: more work, the same attention
    if grad_checkpoint:
        plain = step_cost.price_step(step_cost.StepCase("tiny", 2, 4, 64, 32), "reference")
        assert ref["tflops"] > 1.2 * plain["tflops"] and ref["attention_ms"] == pytest.approx(plain["attention_ms"])


def _unstacked_build(build):
    """``build_model`` with the NLAMs' and NLTP's projections run as three convolutions each."""
    def wrapper(*args, **kwargs):
        model = build(*args, **kwargs)
        for module in model.modules():
            if hasattr(module, "stacked_projections"):
                module.stacked_projections = False
        return model
    return wrapper


def test_grouped_weight_casts_take_two_kernels_per_group_not_two_per_tensor():
    """The fused step with autocast's own weight casts (one kernel per tensor each way) against
    the grouped ones (one ``_foreach_copy_`` kernel per module group each way): the same bytes,
    2 x tensors - 2 x groups kernels fewer. (The projections unstacked in both: stacked, autocast
    casts their concatenation instead of their tensors.)"""
    import fastnl.model
    from fastnl._weight_cast import cast_targets
    from fastnl.model import build_model
    from fastnl.model.network import VideoReIDNet

    case = step_cost.StepCase("tiny", 2, 4, 64, 32)
    with mock.patch.object(fastnl.model, "build_model", _unstacked_build(build_model)):
        grouped = step_cost.price_step(case, "fused", launch_floor=False)
        with mock.patch.object(VideoReIDNet, "_cast_dtype", lambda self, x: None):
            per_tensor = step_cost.price_step(case, "fused", launch_floor=False)
    model = build_model(10, verbose=False)
    tensors = len(cast_targets(model, torch.bfloat16))
    groups = 5 + len(model.nlam) + 2  # the stem, four stages, the NLAMs, temporal, classifier
    assert tensors == 138
    assert per_tensor["launches"] - grouped["launches"] == 2 * tensors - 2 * groups
    assert per_tensor["gbytes"] == pytest.approx(grouped["gbytes"], rel=1e-9)
    assert per_tensor["tflops"] == pytest.approx(grouped["tflops"], rel=1e-12)


def test_stacked_projections_price_fewer_kernels_for_the_same_flops():
    """The fused step with the NLAMs' and NLTP's projections stacked (one GEMM each way, the
    residual's gradient added in the GEMM; the adds themselves are counted on the blocks in
    ``tests/test_stacked_projections.py``) against unstacked, at 64x32 maps: the same flops,
    fewer kernels, a shorter step; more bytes by less than the weights' concatenation (2 bytes
    read and 2 written per stacked weight, which at these tiny maps outweighs the map-sized
    adds saved; at the paper's 256x128 the stacked step moves fewer bytes)."""
    import fastnl.model
    from fastnl.model import build_model

    case = step_cost.StepCase("tiny", 2, 4, 64, 32)
    stacked = step_cost.price_step(case, "fused")
    with mock.patch.object(fastnl.model, "build_model", _unstacked_build(build_model)):
        plain = step_cost.price_step(case, "fused")
    model = build_model(10, verbose=False)
    weights = sum(conv.weight.numel() for m in model.modules() if getattr(m, "stacked_projections", False)
                  for name, conv in m.named_children() if name in ("a", "b", "d", "theta", "phi", "g"))
    assert weights == 3 * (512 * 1024 + 1024 * 2048 + 1024 * 2048)
    assert stacked["tflops"] == pytest.approx(plain["tflops"], rel=1e-9)
    assert stacked["launches"] < plain["launches"]
    assert stacked["step_ms"] < plain["step_ms"]
    assert 0 < (stacked["gbytes"] - plain["gbytes"]) * 1e9 < 4 * weights


def test_step_flops_match_the_backbone_by_hand():
    """SE-ResNet50's convolutions at 64x32: the forward's flops are counted once per op; the
    step (forward, backward with both input and weight gradients) is 3x the forward's conv
    flops to within the first conv (no input gradient) and the small linear layers."""
    case = step_cost.StepCase("tiny", 2, 4, 64, 32)
    with memory.cuda_like(), step_cost.attention_stand_in(step_cost.AttentionCalls(HOPPER)), \
            FakeTensorMode(allow_non_fake_inputs=True):
        from fastnl.model import build_model

        model = build_model(625, impl="reference", verbose=False).train()
        clips = torch.randn(2, 4, 3, 64, 32)
        with step_cost.Roofline() as forward:
            with torch.no_grad(), runtime.autocast("cpu", torch.bfloat16):
                model(clips)
    step = step_cost.price_step(case, "reference")
    ratio = step["tflops"] * 1e12 / forward.flops
    assert 2.7 < ratio < 3.0, ratio


def test_cli_runs_the_suite_and_writes_its_rows(tmp_path, capsys):
    from fastnl import cli
    from fastnl.commands import bench

    assert "step-cost" in bench.ALL and "step-cost" not in bench.DEFAULT_SUITES
    out = tmp_path / "sc.json"
    assert cli.main(["bench", "step-cost", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["suites"]["step-cost"]
    assert [r["case"] for r in rows] == [c.name for c in step_cost.default_cases(quick=True)]
    # at 64x32 the steps are launch-bound (the floors, not the maps, price most kernels)
    assert all(r["predicted_speedup"] > 0.5 and 0 < r["attention_share"] < 1 for r in rows)
    assert all(r["fused_floor_ms"] > 0.5 * r["fused_ms"] for r in rows)
    printed = capsys.readouterr().out
    assert "an estimate" in printed and "predicted_speedup" in printed and "fused_floor_ms" in printed


def test_cli_prices_with_a_given_launch_time_beside_a_measured_step(tmp_path, capsys):
    """``--launch-us`` replaces the least time per kernel; ``--measured`` puts a GPU's measured
    steps (a `fastnl bench model` report) beside the prediction of the same batch, clip length
    and checkpointing: the measured times, speed-up, and each over its prediction."""
    from fastnl import cli

    measured = tmp_path / "bench-model.json"
    measured.write_text(json.dumps({"environment": {"device_name": "NVIDIA H200"}, "suites": {"model": [
        {"case": "paper setting", "shape": "2x4x3x64x32", "grad_checkpoint": False, "reference_ms": 30.0,
         "fused_ms": 24.0, "reference_format": "channels_last", "fused_format": "contiguous"},
        {"case": "other", "shape": "2x4x3x64x32", "grad_checkpoint": True, "reference_ms": 1.0, "fused_ms": 1.0}]}}))
    out = tmp_path / "sc.json"
    assert cli.main(["bench", "step-cost", "--quick", "--device", "cpu", "--launch-us", "8", "--measured",
                     str(measured), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["suites"]["step-cost"]
    assert [r["launch_us"] for r in rows] == [8.0, 8.0]
    first, second = rows
    # every kernel at least 8 us: at 64x32 the floors price most of the fused step, and add at
    # most 8 us per kernel
    assert first["fused_floor_ms"] > 0.6 * first["fused_ms"]
    assert first["fused_launches"] * 8e-3 >= first["fused_floor_ms"]
    assert (first["batch"], first["frames"], first["measured_on"]) == (2, 4, "NVIDIA H200")
    assert first["measured_speedup"] == pytest.approx(30.0 / 24.0)
    assert first["reference_measured_over_predicted"] == pytest.approx(30.0 / first["reference_ms"])
    assert first["fused_measured_over_predicted"] == pytest.approx(24.0 / first["fused_ms"])
    assert first["measured_formats"] == "channels_last / contiguous"  # the fastest format of each model
    assert "measured_reference_ms" not in second  # 1 x 16 frames: nothing measured there
    printed = capsys.readouterr().out
    assert "each kernel at least 8 us" in printed and "measured on NVIDIA H200" in printed


@pytest.mark.parametrize("content,message", [(None, "no file"), ("{}", "not a `fastnl bench model --json` report"),
                                             ('{"suites": {"model": [{"case": "x"}]}}', "no training-step rows")])
def test_measured_file_errors_name_the_cause(tmp_path, content, message):
    from fastnl.errors import UserError

    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        step_cost.read_measured(str(path))


def test_cli_refuses_a_negative_launch_time(capsys):
    from fastnl import cli

    assert cli.main(["bench", "step-cost", "--quick", "--device", "cpu", "--launch-us", "-1"]) != 0
    assert "--launch-us must be a time in microseconds >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("as_on_cuda", [True, False])
def test_fused_bottleneck_prices_its_batch_norm_ops_as_cuda_runs_them(as_on_cuda):
    """A fused bottleneck's step as the pricer sees it: on CUDA (``cuda_like``) bn1 + act1 and
    bn2 + act2 are the Triton op and bn3 with the SE module, the sum and the ReLU the bottleneck
    end's four ops, forward and backward, by the passes their kernels make (the SE module's
    layers the excitation's two), and no BatchNorm of torch's runs; on a CPU the modules run as they are, torch's BatchNorm priced with its second
    read of the map."""
    import contextlib

    from timm.models.resnet import Bottleneck

    from fastnl.model.se_bottleneck import fuse_se_tails

    with memory.cuda_like() if as_on_cuda else contextlib.nullcontext(), FakeTensorMode(allow_non_fake_inputs=True):
        block = Bottleneck(256, 64, attn_layer="se").train()
        assert fuse_se_tails(block) == 1
        x = torch.randn(4, 256, 16, 8, dtype=torch.bfloat16, requires_grad=True)
        with step_cost.Roofline(launch_floor=False) as roof:
            with runtime.autocast("cpu", torch.bfloat16):
                out = block(x)
            out.sum().backward()
    counts = {name: n for name, (_s, n) in roof.per_op.items()}
    if as_on_cuda:
        assert counts["bn_relu"] == counts["bn_relu_backward"] == 2
        assert all(counts[op] == 1 for op in ("bn_pool", "se_tail", "se_tail_bwd_partial", "se_tail_bwd_apply"))
        assert "native_batch_norm" not in counts and "native_batch_norm_backward" not in counts
        # the SE module's layers as the excitation's ops: one forward, one backward (two kernels)
        assert counts["se_excite"] == counts["se_excite_bwd"] == 1
        assert "relu_" not in counts and "threshold_backward" not in counts and "sigmoid" not in counts
        # each forward: x read twice and y written (bf16), weight and bias read and the [7, C]
        # float32 statistics written; bn1 and bn2 have the same [4, 64, 16, 8] maps here
        per_call = 3 * 2 * (4 * 64 * 16 * 8) + 4 * 64 * (2 + 7)
        assert roof.per_op["bn_relu"][0] * HOPPER.bandwidth_tbs * 1e12 == pytest.approx(2 * per_call, rel=1e-6)
        # the statistics of bn3's [4, 256, 16, 8] input y in one read: y, weight and bias read,
        # the statistics, the [4, 256] per-image means (float32) and the squeeze (bf16) written
        stats_bytes = 2 * (4 * 256 * 16 * 8) + 4 * 256 * (2 + 7) + (4 + 2) * (4 * 256)
        assert roof.per_op["bn_pool"][0] * HOPPER.bandwidth_tbs * 1e12 == pytest.approx(stats_bytes, rel=1e-6)
    else:
        assert "bn_relu" not in counts and counts["native_batch_norm"] == 3
        assert counts["relu_"] == counts["threshold_backward"] == 3
        # torch's BatchNorm: its [4, 64, 16, 8] bf16 input read once more than the default
        # price (one read per argument) has it, forward and backward (and the gradient too)
        prices = []
        for second_reads in (step_cost.SECOND_READS, {}):
            roof_bn = step_cost.Roofline(launch_floor=False)
            with mock.patch.object(step_cost, "SECOND_READS", second_reads), \
                    FakeTensorMode(allow_non_fake_inputs=True), roof_bn:
                bn = torch.nn.BatchNorm2d(64).train()
                y = bn(torch.randn(4, 64, 16, 8, dtype=torch.bfloat16, requires_grad=True))
                y.backward(torch.randn_like(y))
            prices.append({op: roof_bn.per_op[op][0] * HOPPER.bandwidth_tbs * 1e12
                           for op in ("native_batch_norm", "native_batch_norm_backward")})
        map_bytes = 2 * (4 * 64 * 16 * 8)
        assert prices[0]["native_batch_norm"] - prices[1]["native_batch_norm"] == pytest.approx(map_bytes)
        assert prices[0]["native_batch_norm_backward"] - prices[1]["native_batch_norm_backward"] == \
            pytest.approx(2 * map_bytes)


def test_foreach_launches_follow_multi_tensor_apply_packing():
    """A kernel per 64 tensors of a two-list op (48 for an out-of-place one) and per 320 chunks
    of 65536 elements, a tensor split across kernels carried on."""
    from fastnl.benchmarks.step_cost import foreach_launches

    def tensors(*numels):
        return [torch.empty(n, device="meta") for n in numels]

    small = tensors(*[10] * 128)
    assert foreach_launches("_foreach_copy_", (small[:64], small[:64])) == 1
    assert foreach_launches("_foreach_copy_", (small[:65], small[:65])) == 2
    assert foreach_launches("_foreach_copy_", (small, small)) == 2
    assert foreach_launches("_foreach_add", (small[:48], small[:48])) == 1
    assert foreach_launches("_foreach_add", (small[:49], small[:49])) == 2
    assert foreach_launches("_foreach_zero_", (small[:110],)) == 1
    big = tensors(320 * 65536, 320 * 65536 + 1, 5)
    assert foreach_launches("_foreach_copy_", (big[:1], big[:1])) == 1
    # the second tensor fills a kernel and spills one chunk into the third, the small one joins it
    assert foreach_launches("_foreach_copy_", (big, big)) == 3
    assert foreach_launches("_foreach_lerp_", (tensors(0, 0), tensors(0, 0), 0.5)) == 1
