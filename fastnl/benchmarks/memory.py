"""Memory of a training step, counted without running the math (``fastnl bench memory``).

The whole model (``build_model``, impl "reference" and "fused", with and without gradient
checkpointing) runs one training step (zero_grad, forward under autocast, loss, backward,
fused Adam, in the order of ``fastnl train``) on fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``): every op computes only the shapes and dtypes
of its outputs, nothing is allocated and no arithmetic runs, so the paper's setting (256x128,
bf16) counts on a CPU in seconds per point. A ``TorchDispatchMode`` on top of the fake mode
sees every op's outputs and tracks their storages: an allocation when a new storage appears,
a free when its last reference dies (a weak reference on the storage), each rounded up to the
CUDA caching allocator's 512-byte blocks. The peak of the live bytes over the step is what
``torch.cuda.max_memory_allocated`` would report for the tensors themselves; the bytes alive at
the end of the forward, less those alive before it, are what the step keeps for backward.

What is counted as on a CUDA GPU, although the fake tensors are CPU tensors (torch's autograd
engine cannot run backward on fake CUDA tensors without a GPU):

- autocast follows CUDA's policy where it differs from the CPU's for this model: CUDA autocast
  runs softmax, log_softmax, sum, prod, cumsum, cumprod, exp, log, pow, rsqrt, logsumexp in
  float32 (CPU autocast leaves softmax in bf16); the convolutions, linear layers and bmm run
  in the autocast dtype on both;
- the fused model's attention is the chunked engine as ``backend="auto"`` runs it on sm_90
  for the model's shapes: half-precision operands kept for the tensor-core GEMMs, the CUDA tile
  plan of :func:`fastnl.attention_chunked.plan`, dK/dV accumulated in place in float32, and its
  row work as the Triton row kernels do it (on fake tensors they allocate their outputs and
  launch nothing): P and dS beside each float32 score tile, and the row statistics M and Z
  [B, L] kept for the backward. The flash kernel (``backend="triton"``) keeps the same O, M and
  Z and has no score tiles, so this count is an upper bound for it;
- the channel attention is the extension's op through its registered fake kernels (it saves
  its input, as the CUDA op does);
- the fused bottlenecks' first two BatchNorm + ReLU pairs are the Triton op
  (``fastnl.ops.batch_norm_relu``) through its fake kernels, as CUDA runs them in training.

Not counted: what the CUDA allocator adds around the tensors (fragmentation of its cached
segments, the CUDA context, cuBLAS/cuDNN workspaces and any temporaries a kernel allocates
inside itself), so a real GPU fits somewhat less than the projection. The loss is the paper's
cross-entropy + batch-hard triplet without the data-dependent skip of anchors that lack a
positive (fake tensors have no values); its tensors are [B, B] and [B, classes].

From the counts: least squares ``a + b N + c N^2`` of the peak (and of the kept bytes) against N
at a fixed batch, the error of that fit made on the smaller N when it predicts the largest one,
and the projections: the largest N at that batch and the largest batch at N = 8 (a line
``a + b B`` through the counts at a few batches) within a budget (default 78 GiB).
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import dataclass

from fastnl.benchmarks import BENCH_IMPLS, generic_table

IMPLS = BENCH_IMPLS
DEFAULT_FRAMES = (8, 16, 32, 64, 128, 256)
DEFAULT_BATCHES = (8, 16, 32)
QUICK_FRAMES = (4, 8, 16)
QUICK_BATCHES = (2, 4)
DEFAULT_BUDGET_MB = 78 * 1024.0  # 78 GiB: an 80 GB H100 less the CUDA context and some slack
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this
MB = 2.0**20

# CUDA autocast's float32 ops (CastPolicy::fp32 and fp32_set_opt_dtype) that this model may call
# on half-precision tensors; CPU autocast leaves several of them (softmax) in the low dtype.
CUDA_FP32_OPS = frozenset({"softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod", "exp", "log",
                           "pow", "rsqrt", "logsumexp", "reciprocal"})


# --------------------------------------------------------------------------------------------
# The counter
# --------------------------------------------------------------------------------------------


def _round_up(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block if block > 1 else nbytes


class LiveStorageTracker:
    """A ``TorchDispatchMode`` that tracks the bytes of the storages alive: every op's output
    storage is added the first time it is seen (each rounded up to ``round_to`` bytes) and
    removed when its last reference dies (inside the chunked attention engine's ops too, whose
    Python bodies it runs). ``live`` and ``peak`` are in bytes; ``peak_op`` names
    the op whose output set the peak. Enter it after (inside) a ``FakeTensorMode`` to count
    without allocating; on real tensors it counts the same way. Tensors made before it was
    entered count once :meth:`track` has been called on them."""

    def __init__(self, round_to: int = 1):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        from fastnl.attention_chunked import op_bodies

        bodies = op_bodies()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                body = bodies.get(func)
                if body is not None:  # the chunked engine's op: count the tiles inside it too
                    with self:
                        out = body(*args, **(kwargs or {}))
                else:
                    out = func(*args, **(kwargs or {}))
                tracker.ops += 1
                tracker._track_tree(out, func)
                return out

        self._mode = _Mode()
        self.round_to = int(round_to)
        self.live = 0
        self.peak = 0
        self.peak_op = None
        self.ops = 0
        self._sizes: dict = {}
        self._refs: dict = {}

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def _track_tree(self, out, func=None) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, func)

    def track(self, tensor, func=None) -> None:
        """Count ``tensor``'s storage from now until it dies (once, however many views share it)."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        size = _round_up(int(storage.nbytes()), self.round_to)
        self._sizes[key] = size
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
            self.peak_op = str(func) if func is not None else None

    def track_module(self, module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.track(t)

    def _free(self, key) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak, self.peak_op = self.live, None


# --------------------------------------------------------------------------------------------
# CUDA's behaviour on fake CPU tensors
# --------------------------------------------------------------------------------------------


def _cuda_autocast_mode():
    """A ``TorchFunctionMode`` that, where CPU autocast is on, runs CUDA autocast's float32 ops
    in float32 (casting half-precision inputs first, as autocast does)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_map

    def up(t):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            return t.float()
        return t

    class _CudaAutocastPolicy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (getattr(func, "__name__", None) in CUDA_FP32_OPS and kwargs.get("dtype") is None
                    and torch.is_autocast_enabled("cpu")):
                args, kwargs = tree_map(up, (tuple(args), kwargs))
            return func(*args, **kwargs)

    return _CudaAutocastPolicy()


_FAKE_BMM_OUT_DTYPE = {"ok": True}


@contextlib.contextmanager
def cuda_like():
    """The chunked engine configured as on CUDA (tensor-core operands, the CUDA tile plan and
    keep budget, dK/dV accumulated in place, the Triton row kernels' allocations), the
    BatchNorm + ReLU pairs of the fused model as the Triton op, and CUDA autocast's float32 ops,
    for counts on fake CPU tensors."""
    import torch

    from fastnl import attention_chunked as ac
    from fastnl import ops

    saved = {name: getattr(ac, name) for name in ("plan", "keep_budget", "tensor_core_operands", "_mm_acc",
                                                  "_rows_impl")}
    original_plan, original_keep_budget, original_rows = saved["plan"], saved["keep_budget"], saved["_rows_impl"]

    def plan(seq_len, batch=1, device_type="cpu"):
        return original_plan(seq_len, batch, "cuda")

    def keep_budget(seq_len, head_dim, batch=1, device_type="cpu"):
        return original_keep_budget(seq_len, head_dim, batch, "cuda")

    def tensor_core_operands(t):
        return t.dtype in (torch.float16, torch.bfloat16) and ac._OUT_DTYPE

    def mm_acc(acc, a, b):
        # CUDA runs torch.baddbmm(acc, a, b, out_dtype=acc.dtype, out=acc): acc written in place,
        # nothing allocated. torch's fake (decomposed) baddbmm with out_dtype fails, so the
        # count writes acc through bmm(out=acc), which allocates nothing either.
        # (torch 2.11 has no fake kernel of bmm with out_dtype: there, nothing is counted for the
        # in-place accumulation, which allocates nothing)
        if a.dtype == acc.dtype:
            acc.baddbmm_(a, b)
        elif _FAKE_BMM_OUT_DTYPE["ok"]:
            try:
                torch.bmm(a, b, out_dtype=acc.dtype, out=acc)
            except NotImplementedError:
                _FAKE_BMM_OUT_DTYPE["ok"] = False

    def rows_impl(rowwise, compute_dtype):
        # what backend="chunked" runs on CUDA: the Triton row kernels (on fake tensors they only
        # allocate: P and dS beside S, M and Z per row), whatever row ops the CPU call names
        return original_rows("triton", compute_dtype)

    def batch_norm_relu_backend(x, training, weight, bias):
        # what "auto" runs on CUDA: the Triton BatchNorm + ReLU op (its fake kernels here)
        ok = training and weight is not None and bias is not None and x.dtype in ops._TRITON_DTYPES
        return "triton" if ok else "reference"

    ac.plan, ac.keep_budget, ac.tensor_core_operands, ac._mm_acc = plan, keep_budget, tensor_core_operands, mm_acc
    ac._rows_impl = rows_impl
    original_bn_relu = ops.batch_norm_relu_backend
    ops.batch_norm_relu_backend = batch_norm_relu_backend
    try:
        with _cuda_autocast_mode():
            yield
    finally:
        for name, value in saved.items():
            setattr(ac, name, value)
        ops.batch_norm_relu_backend = original_bn_relu


# --------------------------------------------------------------------------------------------
# One variant's counts
# --------------------------------------------------------------------------------------------


@dataclass
class Setting:
    height: int = 256
    width: int = 128
    amp: str = "bf16"  # "bf16", "fp16" or "off"
    batch: int = 8  # of the N series
    frames: tuple = DEFAULT_FRAMES
    frames_at: int = 8  # N of the batch series
    batches: tuple = DEFAULT_BATCHES
    budget_mb: float = DEFAULT_BUDGET_MB
    num_classes: int = 625  # MARS's training identities
    impls: tuple = IMPLS
    grad_checkpoint: tuple = (False, True)
    round_to: int = CUDA_BLOCK  # bytes each storage is rounded up to (1: exact tensor bytes)


def _amp_dtype(amp: str):
    from fastnl.runtime import AMP_DTYPES

    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be off, bf16 or fp16, got {amp!r}")
    return AMP_DTYPES[amp]


def _loss(logits, descriptors, pids, margin: float = 0.3):
    """Cross-entropy + batch-hard triplet (``fastnl.losses.ReIDLoss``) on fake tensors: the same
    tensors, without the skip of anchors lacking a positive (which needs values)."""
    import torch
    import torch.nn.functional as F

    from fastnl.losses import euclidean_distances

    ce = F.cross_entropy(logits.float(), pids)
    dist = euclidean_distances(descriptors)
    same = pids[:, None] == pids[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    return ce + F.relu(margin + hardest_pos - hardest_neg).mean()


def _pids(batch: int, num_classes: int):
    import torch

    per_id = 4 if batch >= 8 else 2  # P x K sampling
    return (torch.arange(batch) // per_id) % num_classes


def count_variant(setting: Setting, impl: str, grad_checkpoint: bool, points: list,
                  log=None) -> list[dict]:
    """Count one training step at each (batch, frames) of ``points`` for one model variant.

    The model and the optimizer are built once (on fake tensors) and a first step at the first
    point creates Adam's state, as in training from the second step on; then each point's
    step is counted on its own: ``start_mb`` (parameters, Adam's moments, the input clips),
    ``peak_mb`` (the most alive during the step) and ``kept_mb`` (alive at the end of the
    forward less ``start_mb``: what the step keeps for backward)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastnl import runtime
    from fastnl.model import build_model

    dtype = _amp_dtype(setting.amp)
    rows = []
    with cuda_like(), FakeTensorMode(allow_non_fake_inputs=True), LiveStorageTracker(setting.round_to) as tracker:
        torch.manual_seed(0)
        model = build_model(setting.num_classes, impl=impl, verbose=False).train()
        model.set_grad_checkpointing(grad_checkpoint)
        tracker.track_module(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        params_mb = tracker.live / MB

        def step(batch, frames):
            optimizer.zero_grad(set_to_none=True)
            clips = torch.randn(batch, frames, 3, setting.height, setting.width)
            pids = _pids(batch, setting.num_classes)
            start = tracker.live
            tracker.reset_peak()
            ops0, t0 = tracker.ops, time.perf_counter()
            with runtime.autocast("cpu", dtype):
                logits, descriptors = model(clips)
                loss = _loss(logits, descriptors, pids)
            after_forward = tracker.live
            loss.backward()
            optimizer.step()
            del loss, logits, descriptors, clips, pids
            return {"start_mb": start / MB, "peak_mb": tracker.peak / MB, "kept_mb": (after_forward - start) / MB,
                    "peak_op": tracker.peak_op, "ops": tracker.ops - ops0, "seconds": time.perf_counter() - t0}

        step(*points[0])  # Adam's moments and step counters, as from the second step on
        for batch, frames in points:
            res = step(batch, frames)
            row = {"impl": impl, "grad_checkpoint": grad_checkpoint, "batch": batch, "frames": frames,
                   "L_layer3": frames * (setting.height // 16) * (setting.width // 16),
                   "amp": setting.amp, "resolution": f"{setting.height}x{setting.width}",
                   "params_mb": params_mb, **res}
            rows.append(row)
            if log:
                log(f"  {impl:9s} ckpt {'on ' if grad_checkpoint else 'off'} batch {batch:4d} x N {frames:4d}: "
                    f"peak {res['peak_mb']:9.0f} MB, kept {res['kept_mb']:9.0f} MB "
                    f"({res['ops']} ops, {res['seconds']:.1f} s)")
        del model, optimizer
    return rows


# --------------------------------------------------------------------------------------------
# Fits and projections
# --------------------------------------------------------------------------------------------


def fit_quadratic(points) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of y = a + b x + c x^2 over (x, y) points (exact through 3)."""
    import numpy as np

    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(x) < 3:
        raise ValueError(f"a quadratic fit needs at least 3 points, got {len(x)}")
    design = np.stack([np.ones_like(x), x, x * x], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(a), float(b), float(c)


def fit_line(points) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x over (x, y) points."""
    import numpy as np

    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(x) < 2:
        raise ValueError(f"a line fit needs at least 2 points, got {len(x)}")
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def extrapolation_error(points) -> float | None:
    """Relative error of the quadratic fit made on all points but the largest x when it
    predicts the largest x; None with fewer than 4 points."""
    pts = sorted(points)
    if len(pts) < 4:
        return None
    a, b, c = fit_quadratic(pts[:-1])
    x, y = pts[-1]
    return (a + b * x + c * x * x - y) / y


def largest_within(a: float, b: float, c: float, budget: float, limit: int = 1 << 20) -> int:
    """The largest integer x >= 0 with a + b x + c x^2 <= budget (0 when even x = 1 does not
    fit; ``limit`` when the polynomial never reaches the budget)."""
    def f(x):
        return a + b * x + c * x * x

    if f(1) > budget:
        return 0
    if c > 0:
        disc = b * b - 4 * c * (a - budget)
        x = int(math.floor((-b + math.sqrt(max(disc, 0.0))) / (2 * c)))
    elif b > 0:
        x = int(math.floor((budget - a) / b))
    else:
        return limit
    x = max(1, min(x, limit))
    while x < limit and f(x + 1) <= budget:
        x += 1
    while x > 1 and f(x) > budget:
        x -= 1
    return x


def summarize(rows: list[dict], setting: Setting) -> list[dict]:
    """One row per variant: the fits against N at ``setting.batch`` and against the batch at
    ``setting.frames_at``, the extrapolation error, and the projections within the budget."""
    out = []
    variants = dict.fromkeys((r["impl"], r["grad_checkpoint"]) for r in rows if "peak_mb" in r)
    for impl, ckpt in variants:
        mine = [r for r in rows if r.get("impl") == impl and r.get("grad_checkpoint") == ckpt and "peak_mb" in r]
        by_n = sorted({r["frames"]: r for r in mine if r["batch"] == setting.batch}.values(), key=lambda r: r["frames"])
        by_b = sorted({r["batch"]: r for r in mine if r["frames"] == setting.frames_at}.values(), key=lambda r: r["batch"])
        row = {"kind": "fit", "impl": impl, "grad_checkpoint": ckpt, "batch": setting.batch,
               "frames_at": setting.frames_at, "budget_mb": setting.budget_mb}
        if len(by_n) >= 3:
            peak = [(r["frames"], r["peak_mb"]) for r in by_n]
            kept = [(r["frames"], r["kept_mb"]) for r in by_n]
            a, b, c = fit_quadratic(peak)
            ka, kb, kc = fit_quadratic(kept)
            row.update(peak_a_mb=a, peak_b_mb=b, peak_c_mb=c, kept_a_mb=ka, kept_b_mb=kb, kept_c_mb=kc,
                       per_clip_b_mb=b / setting.batch, per_clip_c_mb=c / setting.batch,
                       kept_per_frame_mb=kb / setting.batch, kept_per_clip_c_mb=kc / setting.batch,
                       frames_fitted=[n for n, _ in peak],
                       extrapolation_error=extrapolation_error(peak),
                       max_frames=largest_within(a, b, c, setting.budget_mb))
            row["fit_residual_max"] = max(abs(a + b * n + c * n * n - y) / y for n, y in peak)
        if len(by_b) >= 2:
            la, lb = fit_line([(r["batch"], r["peak_mb"]) for r in by_b])
            row.update(batch_a_mb=la, batch_b_mb=lb, batches_fitted=[r["batch"] for r in by_b],
                       max_batch=largest_within(la, lb, 0.0, setting.budget_mb))
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def quick_setting() -> Setting:
    return Setting(height=64, width=32, frames=QUICK_FRAMES, batch=2, frames_at=4, batches=QUICK_BATCHES)


def run(device=None, quick: bool = False, setting: Setting | None = None, log=print) -> list[dict]:
    """Suite ``memory``: the counts of every variant of ``setting`` (default: the paper's
    256x128 bf16 at N = 8..256, batch 8; ``quick``: 64x32, N = 4..16, batch 2) and one fit row
    per variant. ``device`` is not used: the counts are those of a CUDA GPU on any machine."""
    setting = setting or (quick_setting() if quick else Setting())
    rows = []
    points = [(setting.batch, n) for n in setting.frames]
    points += [(b, setting.frames_at) for b in setting.batches if (b, setting.frames_at) not in points]
    if log:
        log(f"counting on fake tensors (nothing allocated), {setting.height}x{setting.width}, amp {setting.amp}, "
            f"batch {setting.batch} x N {', '.join(map(str, setting.frames))}; batches "
            f"{', '.join(map(str, setting.batches))} at N={setting.frames_at}")
    for ckpt in setting.grad_checkpoint:
        for impl in setting.impls:
            rows += count_variant(setting, impl, ckpt, points, log=log)
    for row in rows:
        row["kind"] = "count"
    return rows + summarize(rows, setting)


def _name(row: dict) -> str:
    return f"{row['impl']}{' + grad checkpoint' if row['grad_checkpoint'] else ''}"


def format_table(rows: list[dict]) -> str:
    counts = [r for r in rows if r.get("kind") == "count"]
    fits = [r for r in rows if r.get("kind") == "fit"]
    lines = [generic_table(counts, ["impl", "grad_checkpoint", "batch", "frames", "L_layer3", "start_mb",
                                    "kept_mb", "peak_mb", "ops", "seconds"])] if counts else []
    for f in fits:
        if "peak_c_mb" in f:
            err = f.get("extrapolation_error")
            lines.append(
                f"{_name(f)}, batch {f['batch']}: peak {f['peak_a_mb']:.0f} {f['peak_b_mb']:+.2f} N "
                f"{f['peak_c_mb']:+.4f} N^2 MB (per clip {f['per_clip_b_mb']:.2f} N {f['per_clip_c_mb']:+.4f} N^2; "
                f"fit residual <= {100 * f['fit_residual_max']:.2f}%"
                + (f", fit on N < {max(f['frames_fitted'])} predicts N = {max(f['frames_fitted'])} "
                   f"within {100 * err:+.2f}%" if err is not None else "") + "); "
                f"kept for backward {f['kept_per_frame_mb']:.2f} MB per frame {f['kept_per_clip_c_mb']:+.4f} N^2 per clip")
        if "batch_b_mb" in f:
            lines.append(f"{_name(f)}, N={f['frames_at']}: peak {f['batch_a_mb']:.0f} + {f['batch_b_mb']:.1f} B MB")
    if fits:
        budget = fits[0]["budget_mb"]
        lines.append(f"projection within {budget:.0f} MB ({budget / 1024:.1f} GiB; allocator overheads not counted):")
        lines.append(generic_table([{"variant": _name(f), f"max N at batch {f['batch']}": f.get("max_frames"),
                                     f"max batch at N={f['frames_at']}": f.get("max_batch")} for f in fits]))
        by = {(f["impl"], f["grad_checkpoint"]): f for f in fits}
        for ckpt in sorted({f["grad_checkpoint"] for f in fits}):
            ref, fused = by.get(("reference", ckpt)), by.get(("fused", ckpt))
            if ref and fused and ref.get("max_frames") and ref.get("max_batch"):
                lines.append(f"fused / reference{' (grad checkpoint)' if ckpt else ''}: "
                             f"N x{fused['max_frames'] / ref['max_frames']:.2f}, "
                             f"batch x{fused['max_batch'] / ref['max_batch']:.2f}")
    return "\n".join(lines)


__all__ = ["LiveStorageTracker", "Setting", "count_variant", "cuda_like", "extrapolation_error", "fit_line",
           "fit_quadratic", "format_table", "largest_within", "run", "summarize"]
