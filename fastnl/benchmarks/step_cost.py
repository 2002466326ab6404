"""What the attention engine can change in a training step's time: a roofline estimate of the
whole step on a GPU, counted on fake tensors (``fastnl bench step-cost``; no GPU needed).

The step is the one ``fastnl bench memory`` counts (``build_model``, forward under autocast,
the paper's loss, backward, fused Adam) on fake tensors, with CUDA autocast's float32 ops. A
``TorchDispatchMode`` sees every op and prices it on the GPU model of
:mod:`fastnl.attention_engines` (H100/H200: GEMM and convolution flops at 75% of the tensor-core
peak, memory at the HBM bandwidth): ``max(flops / GEMM rate, bytes / bandwidth)``, where the
flops are torch's own formulas (``torch.utils.flop_counter``: mm, bmm, convolutions and their
backward) and the bytes are those of the op's tensor arguments (read) and of its new outputs
and mutated arguments (written), each storage once; the channel-attention extension's ops by
the passes of its CUDA kernels (``OWN_OP_BYTES``), and the training-mode BatchNorms, torch's
and the Triton op's, with their second read of the map (``SECOND_READS``). Views and
allocations cost nothing.

The NLAM's spatial attention is not priced op by op: ``fastnl.ops.nl_attention`` is replaced by
a stand-in that returns an output of the right shape and records the call, and each call
costs what the attention cost model (:func:`fastnl.attention_engines.predict_ms`) predicts
for the engine that runs it: ``plain`` (bmm, softmax, bmm under autocast) in the reference
model, the engine ``auto`` picks on sm_90 in the fused one. Everything else (the backbone,
the NLAM's 1x1 convolutions, the channel attention, the loss, the optimizer) is priced the
same way in both models, so their predicted ratio is what the attention engine changes.

Every kernel takes at least the GPU model's ``launch_us`` (4 us on sm_90: the launch and the
gap to the next kernel of one stream), counted per kernel where an op launches several
(``OWN_OP_LAUNCHES``; a convolution's backward one per gradient it makes, as cuDNN runs them:
``LAUNCH_COUNTERS``): the fused model's BatchNorm ops and their small [C] and [N, C] torch ops
are more kernels than cuDNN's BatchNorm, and at the paper's setting more than half of either
model's kernels are shorter than that floor.

This is an estimate, and an optimistic one for everything but the attention: no kernel below
its roofline, no cuDNN inefficiency at small spatial sizes, and the host assumed to keep ahead
of the GPU (eager PyTorch dispatches an op in a few microseconds; the Triton ops' Python
launches take longer: ``reference_launches`` and ``fused_launches`` say how many there are).
The less time the rest of the step takes, the more of it the attention is, so the predicted
speed-up of the fused model is, as far as the rest of the step goes, an upper bound.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from fastnl.benchmarks import BENCH_IMPLS, generic_table

MB = 2.0**20


@dataclass
class StepCase:
    name: str
    batch: int  # clips
    frames: int  # N
    height: int = 256
    width: int = 128
    amp: str = "bf16"
    grad_checkpoint: bool = False
    num_classes: int = 625  # MARS's training identities

    @property
    def positions(self) -> tuple[int, int]:
        """(L after layer3, L after layer4) of a clip."""
        return (self.frames * (self.height // 16) * (self.width // 16),
                self.frames * (self.height // 32) * (self.width // 32))


def default_cases(quick: bool = False) -> list[StepCase]:
    if quick:
        return [StepCase("quick", 2, 4, 64, 32), StepCase("quick, long clips", 1, 16, 64, 32)]
    # the cases of `fastnl bench model` on a GPU, and clips between
    return [StepCase("paper setting", 32, 8), StepCase("paper setting, grad checkpoint", 32, 8, grad_checkpoint=True),
            StepCase("long clips", 8, 32), StepCase("long clips", 8, 64),
            StepCase("long clips, grad checkpoint", 8, 128, grad_checkpoint=True)]


# --------------------------------------------------------------------------------------------
# Pricing one op
# --------------------------------------------------------------------------------------------


def _tensor_bytes(t) -> int:
    """Bytes of ``t`` as a kernel touches them: its elements, at most its storage (broadcasts)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, int(t.untyped_storage().nbytes()))
    except (RuntimeError, NotImplementedError):
        return n


def _channel_attention_bytes(args, out) -> int:
    # the CUDA forward reads x twice (the pooling pass, then the scale pass) and writes out
    return 2 * _tensor_bytes(args[0]) + _tensor_bytes(out)


def _channel_attention_backward_bytes(args, out) -> int:
    # the pooling pass of grad_out * x reads both, the grad-input pass reads grad_out again and
    # writes grad_x; the weights' gradients are tiny
    return 2 * _tensor_bytes(args[0]) + _tensor_bytes(args[1]) + _tensor_bytes(out[0])


# The extension's ops, priced by the passes their CUDA kernels make (not one read per argument)
def _convolution_backward_bytes(args, out) -> int:
    # grad_output, input, weight, ..., output_mask: the input gradient reads the weight, the
    # weight gradient the input (the input gradient needs only the input's shape); each of
    # them and the bias gradient reads grad_output, in kernels of their own (cuDNN's data- and
    # weight-gradient kernels: see LAUNCH_COUNTERS)
    mask = args[10]
    reads = _tensor_bytes(args[0]) * max(1, sum(bool(m) for m in mask)) + \
        (_tensor_bytes(args[1]) if mask[1] else 0) + (_tensor_bytes(args[2]) if mask[0] else 0)
    return reads + sum(_tensor_bytes(t) for t in out if t is not None)


OWN_OP_BYTES = {("aten", "convolution_backward"): _convolution_backward_bytes,
                ("fastnl", "channel_attention"): _channel_attention_bytes,
                ("fastnl", "channel_attention_backward"): _channel_attention_backward_bytes}

# Ops whose kernels read some arguments twice: the default price (one read per argument) plus
# one more read of these. A training-mode BatchNorm (torch's CUDA kernels, cuDNN's alike, and
# the Triton BatchNorm + ReLU op) reads x once for the statistics and once to normalise; its
# backward reads the gradient and x once for the per-channel sums and once more for dx.
SECOND_READS = {("aten", "native_batch_norm"): (0,), ("aten", "native_batch_norm_backward"): (0, 1),
                ("aten", "cudnn_batch_norm"): (0,), ("aten", "cudnn_batch_norm_backward"): (0, 1),
                ("fastnl", "bn_relu"): (0,), ("fastnl", "bn_relu_backward"): (0, 1)}

# Kernels an op launches where it is not one: (launches, of which tiny). Every kernel takes at
# least the GPU's launch_us (launch and the gap to the next kernel): an op costs
# max(its roofline, launches - tiny floors) + tiny floors. The Triton ops launch what
# fastnl.kernels.batch_norm / bn_se_tail do (a statistics pass, a finalize over [G, C]
# partials, an apply pass; bn_pool a statistics pass, the finalize and one kernel on [N, C];
# bn_stats the statistics pass and the finalize; se_excite_bwd its rows' and weights' kernels); the
# extension's channel attention its two passes over x and the MLP's ops on [B, N, C] (counted
# in csrc/channel_attention.cpp). Ops not listed launch one kernel.
OWN_OP_LAUNCHES = {("fastnl", "bn_relu"): (3, 1), ("fastnl", "bn_relu_backward"): (3, 1),
                   ("fastnl", "bn_pool"): (3, 2), ("fastnl", "bn_stats"): (2, 1), ("fastnl", "se_excite_bwd"): (2, 1),
                   ("fastnl", "channel_attention"): (17, 15), ("fastnl", "channel_attention_backward"): (40, 38)}


def _convolution_backward_launches(args) -> int:
    """cuDNN's convolution backward runs the input gradient, the weight gradient and the bias
    gradient (a reduction of grad_output) as separate kernels: one per gradient asked for
    (``output_mask``)."""
    return max(1, sum(bool(m) for m in args[10]))


def _se_excite_flops(args, products: int) -> int:
    # squeeze [N, C], w1 [R, C] (the forward's and the backward's argument 3 and 4): each
    # product an N x C x R GEMM
    squeeze, w1 = (args[0], args[1]) if len(args) == 5 else (args[3], args[4])
    return 2 * products * squeeze.shape[0] * squeeze.shape[1] * w1.shape[0]


# The project's ops that multiply on tensor cores, by their GEMMs (torch's formulas know the
# aten ops only): the SE excitation two products forward (fc1, fc2), four backward
OWN_OP_FLOPS = {("fastnl", "se_excite"): lambda args: _se_excite_flops(args, 2),
                ("fastnl", "se_excite_bwd"): lambda args: _se_excite_flops(args, 4)}

# Ops whose kernel count depends on their arguments: name -> function of the arguments
LAUNCH_COUNTERS = {("aten", "convolution_backward"): _convolution_backward_launches}


# Ops whose destination arguments (positions) are written, not read: a copy.
WRITE_ONLY = {("aten", "copy_"): (0,), ("aten", "_foreach_copy_"): (0,)}

# torch's multi-tensor apply on CUDA (the ``_foreach_`` ops): one kernel takes at most
# FOREACH_MAX_TENSORS[depth] tensors (depth: the tensor lists, an out-of-place op's result
# included) and FOREACH_MAX_BLOCKS chunks of FOREACH_CHUNK elements; the 4 KB kernel-argument
# limits (builds for CUDA 13 allow more: the count is an upper bound there).
FOREACH_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
FOREACH_MAX_BLOCKS = 320
FOREACH_CHUNK = 65536


def foreach_launches(name: str, args) -> int:
    """The kernels a CUDA ``_foreach_`` op ``name`` launches on ``args``, as torch's
    multi_tensor_apply packs the tensors and their chunks (a tensor split across kernels
    carried on to the next)."""
    import torch

    lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
    if not lists:
        return 1
    depth = min(len(lists) + (0 if name.endswith("_") else 1), max(FOREACH_MAX_TENSORS))
    max_tensors = FOREACH_MAX_TENSORS[depth]
    numels = [t.numel() for t in lists[0] if t.numel()]
    launches = tensors = blocks = 0
    for index, numel in enumerate(numels):
        tensors += 1
        chunks = -(-numel // FOREACH_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last_chunk = chunk == chunks - 1
            if blocks == FOREACH_MAX_BLOCKS or (last_chunk and (tensors == max_tensors or index == len(numels) - 1)):
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return max(launches, 1)


class Roofline:
    """A ``TorchDispatchMode`` that prices every op it sees on ``gpu`` (see the module's doc) and
    sums ``gemm_s`` (ops with flops, each at max(flops, bytes) time), ``memory_s`` (the others),
    ``flops`` and ``bytes``; ``per_op`` holds (seconds, count) per op name. Each kernel takes at
    least ``gpu.launch_us`` (``OWN_OP_LAUNCHES``; ``launch_floor=False``: the rooflines alone):
    ``floor_s`` is what that adds, ``launches`` the kernels counted. Enter it inside a
    ``FakeTensorMode`` to price without computing."""

    FREE = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh",
                      "detach", "alias", "_local_scalar_dense", "set_", "resize_", "record_stream",
                      "promote_types"})
    # metadata queries (prim.device, as fake tensors answer .device under a mode) and markers
    FREE_NAMESPACES = frozenset({"prim", "profiler"})

    def __init__(self, gpu=None, launch_floor: bool = True):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        from fastnl.attention_engines import HOPPER

        self.gpu = gpu or HOPPER
        self.launch_floor = launch_floor
        self.gemm_s = self.memory_s = 0.0
        self.floor_s = 0.0  # what the launch floors add to the rooflines
        self.launches = 0
        self.flops = self.bytes = 0
        self.ops = 0
        self.per_op: dict = {}
        roofline = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                name = packet.__name__
                if func.is_view or name in Roofline.FREE or func.namespace in Roofline.FREE_NAMESPACES:
                    return out
                flops = 0
                formula = flop_registry.get(packet)
                if formula is None and name.endswith("_") and func.namespace == "aten":
                    # an in-place GEMM (baddbmm_, addmm_) does its out-of-place form's flops
                    formula = flop_registry.get(getattr(torch.ops.aten, name[:-1], None))
                if formula is not None:
                    flops = int(formula(*args, **kwargs, out_val=out))
                elif (func.namespace, name) in OWN_OP_FLOPS:
                    flops = int(OWN_OP_FLOPS[(func.namespace, name)](args))
                own = OWN_OP_BYTES.get((func.namespace, name))
                nbytes = own(args, out) if own is not None else roofline.op_bytes(func, args, kwargs, out)
                nbytes += sum(_tensor_bytes(args[i]) for i in SECOND_READS.get((func.namespace, name), ()))
                launches = OWN_OP_LAUNCHES.get((func.namespace, name), (1, 0))
                if func.namespace == "aten" and name.startswith("_foreach_"):
                    launches = (foreach_launches(name, args), 0)
                elif (func.namespace, name) in LAUNCH_COUNTERS:
                    launches = (LAUNCH_COUNTERS[(func.namespace, name)](args), 0)
                roofline.add(name, flops, nbytes, roofline.op_dtype(args, out), launches)
                return out

        self._mode = _Mode()
        self._torch = torch

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    @staticmethod
    def op_bytes(func, args, kwargs, out) -> int:
        """Bytes read (the tensor arguments, less the destinations a copy only writes:
        ``WRITE_ONLY``) plus bytes written (new outputs, mutated arguments), each tensor once
        per side (the same view of a storage twice is one read; distinct views of one storage,
        as the slices of a split, are read each)."""
        import torch
        from torch.utils._pytree import tree_leaves

        def key(t):
            return t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride())

        schema_args = func._schema.arguments
        mutated = []
        for i, a in enumerate(schema_args):
            if a.alias_info is not None and a.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(a.name)
                mutated += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        skip = WRITE_ONLY.get((func.namespace, func._overloadpacket.__name__), ())
        read_args = [a for i, a in enumerate(args) if i not in skip]
        reads = {key(t): _tensor_bytes(t) for t in tree_leaves((read_args, kwargs)) if isinstance(t, torch.Tensor)}
        writes = {key(t): _tensor_bytes(t) for t in mutated}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                writes.setdefault(key(t), _tensor_bytes(t))
        return sum(reads.values()) + sum(writes.values())

    @staticmethod
    def op_dtype(args, out):
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves((out, args)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.dtype
        return torch.float32

    def seconds(self, flops: int, nbytes: int, dtype) -> float:
        torch = self._torch
        gpu = self.gpu
        if dtype in (torch.float16, torch.bfloat16):
            rate = gpu.tensor_tflops * gpu.gemm_efficiency
        elif dtype == torch.float32:
            # cuDNN convolutions may use TF32 (torch's default), matmuls do not: the fp32 rate
            rate = gpu.fp32_tflops * gpu.gemm_efficiency
        else:
            rate = gpu.fp32_tflops / 2 * gpu.gemm_efficiency
        return max(flops / (rate * 1e12), nbytes / (gpu.bandwidth_tbs * 1e12))

    def add(self, name: str, flops: int, nbytes: int, dtype, launches: tuple = (1, 0)) -> None:
        kernels, tiny = launches
        floor = self.gpu.launch_us * 1e-6 if self.launch_floor else 0.0
        roof = self.seconds(flops, nbytes, dtype)
        s = max(roof, (kernels - tiny) * floor) + tiny * floor
        self.floor_s += s - roof
        self.launches += kernels
        if flops:
            self.gemm_s += s
        else:
            self.memory_s += s
        self.flops += flops
        self.bytes += nbytes
        self.ops += 1
        seconds, count = self.per_op.get(name, (0.0, 0))
        self.per_op[name] = (seconds + s, count + 1)

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.memory_s


# --------------------------------------------------------------------------------------------
# The attention stand-in
# --------------------------------------------------------------------------------------------


@dataclass
class AttentionCalls:
    """The calls the stand-in saw: (engine, dtype, B, L, D, "fwd" or "bwd") and their predicted
    milliseconds (forward; backward = forward + backward less forward)."""

    gpu: object = None
    calls: list = field(default_factory=list)
    ms: float = 0.0

    def engine(self, backend: str, dtype, L: int, D: int) -> str:
        if backend == "plain":
            return "plain"
        if backend == "auto":
            from fastnl.attention_engines import choose

            return choose(dtype, D, L, tuple(self.gpu.capability))[0]
        return backend

    def clear(self) -> None:
        self.calls, self.ms = [], 0.0

    def record(self, engine: str, dtype, B: int, L: int, D: int, part: str) -> None:
        from fastnl.attention_engines import dtype_name, predict_ms

        pred = predict_ms(engine, dtype_name(dtype), B, L, D, self.gpu)
        ms = pred["fwd_ms"] if part == "fwd" else pred["fwd_bwd_ms"] - pred["fwd_ms"]
        self.calls.append({"engine": engine, "dtype": dtype_name(dtype), "B": B, "L": L, "D": D, "part": part,
                           "ms": ms})
        self.ms += ms


@contextlib.contextmanager
def attention_stand_in(calls: AttentionCalls):
    """``fastnl.ops.nl_attention`` replaced by a shape-only stand-in that records each forward
    and backward in ``calls`` (priced by the attention cost model, not by the op counter)."""
    import torch

    from fastnl import ops

    class _StandIn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, engine):
            ctx.engine, ctx.shape, ctx.dtype = engine, tuple(q.shape), q.dtype
            B, L, D = q.shape
            calls.record(engine, q.dtype, B, L, D, "fwd")
            return q.new_empty(B, L, v.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            B, L, D = ctx.shape
            calls.record(ctx.engine, ctx.dtype, B, L, D, "bwd")
            return grad.new_empty(B, L, D), grad.new_empty(B, L, D), grad.new_empty(B, L, D), None

    original = ops.nl_attention

    def stand_in(q, k, v, *, scale=1.0, backend="auto"):
        return _StandIn.apply(q, k, v, calls.engine(backend, q.dtype, q.shape[1], q.shape[-1]))

    ops.nl_attention = stand_in
    try:
        yield
    finally:
        ops.nl_attention = original


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


def price_step(case: StepCase, impl: str, gpu=None, launch_floor: bool = True) -> dict:
    """The predicted time of one training step of ``impl`` at ``case`` on ``gpu`` (default
    H100/H200): the op counter's seconds for everything but the attention (``launch_floor``:
    see :class:`Roofline`), the cost model's for the attention calls."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastnl import runtime
    from fastnl.attention_engines import HOPPER
    from fastnl.benchmarks.memory import _amp_dtype, _loss, _pids, cuda_like
    from fastnl.model import build_model

    gpu = gpu or HOPPER
    dtype = _amp_dtype(case.amp)
    calls = AttentionCalls(gpu)
    t0 = time.perf_counter()
    with cuda_like(), attention_stand_in(calls), FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        model = build_model(case.num_classes, impl=impl, verbose=False).train()
        model.set_grad_checkpointing(case.grad_checkpoint)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        clips = torch.randn(case.batch, case.frames, 3, case.height, case.width)
        pids = _pids(case.batch, case.num_classes)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast("cpu", dtype):
                logits, descriptors = model(clips)
                loss = _loss(logits, descriptors, pids)
            loss.backward()
            optimizer.step()

        step()  # Adam's state is created here, as in training before the steps that repeat
        calls.clear()
        with Roofline(gpu, launch_floor) as roof:
            step()
        del model, optimizer
    engines = sorted({(c["engine"], c["L"], c["D"]) for c in calls.calls})
    rest_ms = 1e3 * roof.total_s
    L3, L4 = case.positions
    return {"case": case.name, "impl": impl, "batch": case.batch, "frames": case.frames, "L_layer3": L3,
            "L_layer4": L4, "resolution": f"{case.height}x{case.width}", "amp": case.amp,
            "grad_checkpoint": case.grad_checkpoint, "step_ms": rest_ms + calls.ms, "attention_ms": calls.ms,
            "rest_ms": rest_ms, "gemm_ms": 1e3 * roof.gemm_s, "memory_ms": 1e3 * roof.memory_s,
            "tflops": roof.flops / 1e12, "gbytes": roof.bytes / 1e9, "ops": roof.ops,
            "launches": roof.launches, "floor_ms": 1e3 * roof.floor_s,
            "attention_calls": len(calls.calls),
            "top_ops_ms": {name: round(1e3 * sec, 3) for name, (sec, _n) in
                           sorted(roof.per_op.items(), key=lambda kv: -kv[1][0])[:10]},
            "engines": ", ".join(f"{e} (L={L}, D={D})" for e, L, D in engines),
            "gpu": gpu.name, "launch_us": gpu.launch_us, "seconds": time.perf_counter() - t0}


def compare(case: StepCase, gpu=None, launch_floor: bool = True) -> dict:
    """Both models at ``case``: the fused step's predicted speed-up over the reference's, and the
    share of the reference step that its attention takes."""
    rows = {impl: price_step(case, impl, gpu, launch_floor) for impl in BENCH_IMPLS}
    ref, fused = rows["reference"], rows["fused"]
    return {"case": case.name, "batch": case.batch, "frames": case.frames, "L_layer3": case.positions[0],
            "amp": case.amp, "grad_checkpoint": case.grad_checkpoint,
            "reference_ms": ref["step_ms"], "fused_ms": fused["step_ms"],
            "rest_ms": ref["rest_ms"], "rest_fused_ms": fused["rest_ms"],
            "attention_plain_ms": ref["attention_ms"], "attention_fused_ms": fused["attention_ms"],
            "attention_share": ref["attention_ms"] / ref["step_ms"],
            "predicted_speedup": ref["step_ms"] / fused["step_ms"],
            "speedup_if_attention_free": ref["step_ms"] / fused["rest_ms"],
            "reference_launches": ref["launches"], "fused_launches": fused["launches"],
            "reference_floor_ms": ref["floor_ms"], "fused_floor_ms": fused["floor_ms"],
            "engines": fused["engines"], "gpu": fused["gpu"], "launch_us": fused["launch_us"], "rows": rows}


def read_measured(path: str) -> list[dict]:
    """The training-step rows of a ``fastnl bench model --json`` report (a GPU's: the suite's
    ``data/bench-nlam-model.json``), each with its batch and clip length; a UserError naming the
    file where it cannot be read or holds no step."""
    import json

    from fastnl.errors import UserError

    try:
        with open(path) as f:
            report = json.load(f)
        rows = report["suites"]["model"]
    except FileNotFoundError:
        raise UserError(f"--measured: no file {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--measured: {path} is not a `fastnl bench model --json` report with a model suite "
                        f"({type(err).__name__}: {err})") from None
    out = []
    for row in rows:
        try:
            batch, frames = (int(v) for v in str(row["shape"]).split("x")[:2])
        except (KeyError, ValueError):
            continue
        out.append({**row, "batch": batch, "frames": frames,
                    "device_name": row.get("device_name") or report.get("environment", {}).get("device_name")})
    if not out:
        raise UserError(f"--measured: {path} has no training-step rows")
    return out


def beside_measured(row: dict, measured: list[dict]) -> dict:
    """``row`` (a :func:`compare` row) with the measured step of the same batch, clip length and
    checkpointing, where ``measured`` has one: both times, the measured speed-up and each
    measurement over its prediction (and, where the measured row compared memory formats, the
    format each model's time is of: the prediction knows none)."""
    for m in measured:
        if (m["batch"], m["frames"], bool(m.get("grad_checkpoint"))) != \
                (row["batch"], row["frames"], bool(row["grad_checkpoint"])):
            continue
        ref, fused = m.get("reference_ms"), m.get("fused_ms")
        row = {**row, "measured_on": m.get("device_name"), "measured_reference_ms": ref, "measured_fused_ms": fused}
        if m.get("reference_format") or m.get("fused_format"):
            row["measured_formats"] = f"{m.get('reference_format', '-')} / {m.get('fused_format', '-')}"
        if ref and fused:
            row.update(measured_speedup=ref / fused, reference_measured_over_predicted=ref / row["reference_ms"],
                       fused_measured_over_predicted=fused / row["fused_ms"])
        return row
    return row


def run(device=None, quick: bool = False, cases: list[StepCase] | None = None, log=print,
        launch_us: float | None = None, measured: list[dict] | None = None) -> list[dict]:
    """Suite ``step-cost``: :func:`compare` at every case (default: the GPU cases of ``fastnl
    bench model`` and longer clips; ``quick``: 64x32). ``device`` is not used: the prediction
    is for an H100/H200 on any machine; ``launch_us`` replaces its least time per kernel;
    ``measured`` (:func:`read_measured`) puts a GPU's measured steps beside the prediction."""
    import dataclasses

    from fastnl.attention_engines import HOPPER
    from fastnl.benchmarks import live_rows

    gpu = HOPPER if launch_us is None else dataclasses.replace(HOPPER, launch_us=float(launch_us))
    out = live_rows()
    for case in cases or default_cases(quick):
        if log:
            log(f"  pricing {case.name}: {case.batch} clips x {case.frames} frames, {case.height}x{case.width}, "
                f"amp {case.amp}{', grad checkpoint' if case.grad_checkpoint else ''} ...")
        row = compare(case, gpu)
        row.pop("rows")
        out.append(beside_measured(row, measured) if measured else row)
    return list(out)


COLUMNS = ["case", "batch", "frames", "L_layer3", "grad_checkpoint", "reference_ms", "fused_ms", "rest_ms",
           "attention_plain_ms", "attention_fused_ms", "attention_share", "predicted_speedup",
           "speedup_if_attention_free", "reference_launches", "fused_launches", "fused_floor_ms", "engines"]
MEASURED_COLUMNS = ["case", "batch", "frames", "grad_checkpoint", "reference_ms", "measured_reference_ms",
                    "reference_measured_over_predicted", "fused_ms", "measured_fused_ms",
                    "fused_measured_over_predicted", "predicted_speedup", "measured_speedup", "measured_formats"]


def format_table(rows: list[dict]) -> str:
    gpu = rows[0].get("gpu", "GPU") if rows else "GPU"
    from fastnl.attention_engines import HOPPER

    floor = rows[0]["launch_us"] if rows else HOPPER.launch_us
    text = (f"predicted training step on {gpu} (an estimate: the rest of the step at its roofline, each kernel "
            f"at least {floor:g} us, the attention by the cost model; fused_floor_ms: what those floors add to the "
            f"fused step)\n" + generic_table(rows, COLUMNS))
    beside = [r for r in rows if "measured_reference_ms" in r]
    if beside:
        text += (f"\n\nmeasured on {beside[0].get('measured_on') or 'a GPU'} (fastnl bench model) beside the "
                 f"prediction\n" + generic_table(beside, MEASURED_COLUMNS))
    return text


__all__ = ["AttentionCalls", "Roofline", "StepCase", "attention_stand_in", "beside_measured", "compare",
           "default_cases", "format_table", "price_step", "read_measured", "run"]
