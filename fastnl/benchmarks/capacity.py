"""Capacity search (``fastnl bench capacity``): the largest batch and the longest clips that train.

For the reference and the fused model, with and without gradient checkpointing: the largest
batch at N=8 frames and the largest N at batch 8 for which one training step (forward, loss,
backward, Adam) runs without running out of memory. Every probe is a fresh subprocess (an
out-of-memory error leaves nothing behind, and on a CPU the peak resident set is that
probe's own). The search doubles until a probe fails and then narrows the bracket, alternating a step
predicted from the peaks measured so far (linear in the batch, up to quadratic in N) with a
plain bisection step.

A probe fits when the step finishes: on CUDA without an out-of-memory error (within
``budget_mb`` when given, through ``torch.cuda.set_per_process_memory_fraction``); on a CPU when
its peak resident memory above the start stays within ``budget_mb`` (a hard address-space
limit of twice the budget protects the machine). The peaks of the probes at the fixed batch
give the plot of peak memory against N.

On a CPU the default target is scaled down to one NLAM block (C=256, 8x4 maps): at any clip
length a CPU can run, the whole model's memory is the backbone's, linear in N (the reference's
L x L matrices overtake it only near L ~ 4e4 positions); on the block alone the reference's
quadratic growth and the fused block's linear growth are both measurable in minutes.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from fastnl.benchmarks import BENCH_IMPLS, emit, peak_rss_mb, reset_peak_rss_mb, run_subprocess, timer

IMPLS = BENCH_IMPLS


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass
class Search:
    """Result of ``largest_fitting``: ``best`` fits (0 when even 1 does not), ``failed`` is the
    smallest size seen to fail (None when none failed), ``exact`` is False when the search
    stopped on its deadline before the bracket closed."""

    best: int
    failed: int | None
    exact: bool
    at_limit: bool
    probes: list = field(default_factory=list)  # (size, fits, peak_mb)


def _predict(points: list, budget: float | None, degree: int) -> float | None:
    """Size at which a polynomial of ``degree`` (<= 2) through the fitting probes' (size, peak)
    reaches ``budget``; None when it cannot tell."""
    if budget is None or len(points) < degree + 1:
        return None
    pts = sorted(points)[-3:] if degree >= 2 and len(points) >= 3 else sorted(points)[-2:]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if len(pts) == 3:
        (x0, x1, x2), (y0, y1, y2) = xs, ys
        denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
        if denom == 0:
            return None
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
        b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
        c = y0 - a * x0 * x0 - b * x0
        if a > 1e-12:
            disc = b * b - 4 * a * (c - budget)
            if disc >= 0:
                return (-b + math.sqrt(disc)) / (2 * a)
        pts = pts[-2:]
        xs, ys = xs[-2:], ys[-2:]
    slope = (ys[1] - ys[0]) / (xs[1] - xs[0]) if xs[1] != xs[0] else 0.0
    if slope <= 0:
        return None
    return xs[1] + (budget - ys[1]) / slope


def largest_fitting(probe: Callable[[int], tuple[bool, float | None]], *, start: int, limit: int,
                    budget_mb: float | None = None, degree: int = 1, rel_tol: float = 0.0,
                    deadline: float | None = None, clock: Callable[[], float] = time.monotonic) -> Search:
    """The largest size in [1, limit] for which ``probe(size)`` returns (True, peak_mb).

    Assumes fitting is monotone (a size fits when a larger one does). Doubles from ``start``
    (or halves when ``start`` fails), then narrows the bracket (lo fits, hi fails) until
    ``hi - lo <= max(1, rel_tol * lo)``, alternating a size predicted from the peaks and
    ``budget_mb`` with the midpoint. Stops early, with ``exact=False``, at ``deadline``.
    """
    if limit < 1 or start < 1:
        raise ValueError(f"start and limit must be >= 1, got {start}, {limit}")
    start = min(start, limit)
    probes: list = []
    seen: dict = {}

    def attempt(size: int) -> bool:
        if size not in seen:
            fits, peak = probe(size)
            seen[size] = bool(fits)
            probes.append((size, bool(fits), peak))
        return seen[size]

    def out_of_time() -> bool:
        return deadline is not None and clock() >= deadline

    def result(lo, hi, exact):
        return Search(lo, hi, exact, at_limit=(lo == limit), probes=probes)

    lo, hi = 0, None
    if attempt(start):
        lo = start
        while lo < limit:
            if out_of_time():
                return result(lo, hi, False)
            nxt = 2 * lo
            guess = _predict([(s, p) for s, f, p in probes if f and p is not None], budget_mb, degree)
            if guess is not None and guess > 2 * lo:  # far below the budget: jump to just under it
                nxt = min(int(guess * 0.97), 4 * lo)
            elif guess is not None and guess > lo:  # close: step just past it to close the bracket
                nxt = max(lo + 1, int(guess * 1.03) + 1)
            nxt = min(nxt, limit)
            if attempt(nxt):
                lo = nxt
            else:
                hi = nxt
                break
        if hi is None:
            return result(lo, None, True)
    else:
        hi = start
        while hi > 1:
            if out_of_time():
                return result(0, hi, False)
            nxt = hi // 2
            if attempt(nxt):
                lo = nxt
                break
            hi = nxt
        if lo == 0:
            return result(0, hi, True)
    turn = 0
    while hi - lo > max(1, int(rel_tol * lo)):
        if out_of_time():
            return result(lo, hi, False)
        mid = (lo + hi) // 2
        guess = _predict([(s, p) for s, f, p in probes if f and p is not None], budget_mb, degree)
        if turn % 2 == 0 and guess is not None and lo < int(guess) < hi:
            mid = int(guess)
        turn += 1
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return result(lo, hi, True)


# --------------------------------------------------------------------------------------------
# One probe (runs in a subprocess)
# --------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """What one capacity search trains: ``target`` "model" or "nlam" (one NLAM block of
    ``channels`` on ``height`` x ``width`` maps)."""

    target: str
    device: str
    height: int
    width: int
    channels: int = 0
    amp: str = "off"
    budget_mb: float | None = None


def _is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return any(s in text for s in ("out of memory", "can't allocate memory", "not enough memory",
                                   "Cannot allocate memory", "std::bad_alloc"))


def probe_step(setting: Setting, impl: str, grad_checkpoint: bool, batch: int, frames: int) -> dict:
    """Build and train one step in this process; {"ok", "oom", "peak_mb", "seconds", "error"}."""
    import torch

    from fastnl.benchmarks.model import Case, model_step, nlam_step

    on_cuda = setting.device.startswith("cuda")
    case = Case(setting.target, "capacity", batch, frames, setting.height, setting.width,
                channels=setting.channels, amp=setting.amp, grad_checkpoint=grad_checkpoint)
    if on_cuda:
        torch.cuda.init()
        if setting.budget_mb:
            total = torch.cuda.get_device_properties(setting.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, setting.budget_mb * 2**20 / total), setting.device)
        base = torch.cuda.memory_allocated(setting.device) / 2**20
    else:
        base = reset_peak_rss_mb()
        if setting.budget_mb:
            _cap_address_space(2 * setting.budget_mb)
    builder = model_step if setting.target == "model" else nlam_step
    try:  # one build and step, exactly once: a second could run out of memory on its own
        seconds = timer.once_s(lambda: builder(case, impl, setting.device)(), setting.device)
    except Exception as err:
        if _is_oom(err):
            return {"ok": False, "oom": True, "error": str(err).splitlines()[0][:200]}
        raise
    if on_cuda:
        peak = torch.cuda.max_memory_allocated(setting.device) / 2**20 - base
    else:
        peak = peak_rss_mb() - base
    fits = on_cuda or not setting.budget_mb or peak <= setting.budget_mb
    return {"ok": bool(fits), "oom": not fits, "peak_mb": peak, "seconds": seconds}


def _cap_address_space(extra_mb: float) -> None:
    """Limit this process's address space to its current size plus ``extra_mb``."""
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    except (OSError, StopIteration):
        return
    limit = int(vm + extra_mb * 2**20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _child(payload: dict) -> None:
    from fastnl.benchmarks.model import Case, prepare_child

    setting = Setting(**payload["setting"])
    warm = Case(setting.target, "warm-up", 1, 1, setting.height, setting.width, channels=setting.channels,
                amp=setting.amp, grad_checkpoint=payload["grad_checkpoint"])
    prepare_child(payload.get("threads"), warm, payload["impl"], setting.device)
    try:
        emit(probe_step(setting, payload["impl"], payload["grad_checkpoint"], payload["batch"], payload["frames"]))
    except Exception as err:
        emit({"ok": False, "oom": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"})


def probe_isolated(setting: Setting, impl: str, grad_checkpoint: bool, batch: int, frames: int,
                   timeout: float | None = None) -> dict:
    import os

    import torch

    payload = {"setting": asdict(setting), "impl": impl, "grad_checkpoint": grad_checkpoint, "batch": batch,
               "frames": frames, "threads": torch.get_num_threads()}
    env = dict(os.environ)
    env.setdefault("FASTNL_AUTOTUNE", "0")  # memory does not depend on the tile choice; compile once
    return run_subprocess("fastnl.benchmarks.capacity", payload, timeout=timeout, env=env)


# --------------------------------------------------------------------------------------------
# The whole search
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    setting: Setting
    frames_at: int = 8  # N of the batch search
    batch_at: int = 8  # batch of the N search
    max_batch: int = 1024
    max_frames: int = 1024
    start_batch: int = 8
    start_frames: int = 8
    rel_tol: float = 0.05
    time_limit: float = 300.0
    grad_checkpoint: tuple = (False, True)
    impls: tuple = IMPLS
    predict_budget_mb: float | None = None  # what the step predictions aim at (default: the budget)
    curve_frames: tuple = ()  # more N for the plot, probed after the searches (up to each max)


def default_plan(device: str, *, quick: bool = False, budget_mb: float | None = None,
                 target: str | None = None, time_limit: float | None = None) -> Plan:
    """The paper's setting on CUDA (256x128, bf16, whole model); scaled down on a CPU."""
    on_cuda = device.startswith("cuda")
    target = target or ("model" if on_cuda else "nlam")
    if on_cuda:
        setting = Setting(target, device, 256, 128, channels=1024 if target == "nlam" else 0,
                          amp="bf16", budget_mb=budget_mb)
        plan = Plan(setting, max_batch=2048, max_frames=4096, time_limit=time_limit or 300.0)
        if budget_mb is None:
            import torch

            total = torch.cuda.get_device_properties(device).total_memory / 2**20
            plan.predict_budget_mb = 0.92 * total  # allocator overhead: OOM comes before the full size
    elif target == "nlam":
        # layer3's 16x8 maps (L = 128 N) with few channels, so that L reaches 16384 in seconds
        setting = Setting("nlam", device, 16, 8, channels=64, budget_mb=budget_mb or 512.0)
        plan = Plan(setting, batch_at=2, max_batch=512, max_frames=128, grad_checkpoint=(False,), rel_tol=0.1,
                    time_limit=time_limit or 900.0, curve_frames=(8, 16, 24, 32, 48, 64, 96, 128))
    else:
        setting = Setting("model", device, 64, 32, budget_mb=budget_mb or 1024.0)
        plan = Plan(setting, batch_at=2, max_batch=64, max_frames=128, rel_tol=0.1,
                    time_limit=time_limit or 900.0)
    if quick:
        plan.rel_tol = max(plan.rel_tol, 0.25)
        plan.max_batch, plan.max_frames = min(plan.max_batch, 64), min(plan.max_frames, 32)
        plan.time_limit = min(plan.time_limit, 120.0)
        plan.curve_frames = ()
    if target == "nlam":
        plan.grad_checkpoint = (False,)  # checkpointing applies to the backbone stages only
    return plan


def fit_growth(points: list) -> dict | None:
    """Least-squares ``peak = a + b N + c N^2`` over (N, peak_mb); with the share of the
    quadratic term at the largest N."""
    import numpy as np

    if len(points) < 3:
        return None
    n = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    design = np.stack([np.ones_like(n), n, n * n], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    top = n.max()
    peak_top = a + b * top + c * top * top
    return {"a_mb": float(a), "b_mb_per_frame": float(b), "c_mb_per_frame2": float(c),
            "quadratic_share_at_max": float(c * top * top / peak_top) if peak_top > 0 else None,
            "max_frames_fitted": int(top)}


def run_capacity(plan: Plan, *, log: Callable[[str], None] = print,
                 probe: Callable | None = None) -> dict:
    """Every search of ``plan``; ``probe(impl, ckpt, batch, frames) -> dict`` defaults to a subprocess."""
    setting = plan.setting
    target_mb = plan.predict_budget_mb or setting.budget_mb
    if probe is None:
        def probe(impl, ckpt, batch, frames):
            return probe_isolated(setting, impl, ckpt, batch, frames)

    variants = [(impl, ckpt) for ckpt in plan.grad_checkpoint for impl in plan.impls]
    rows = [{"impl": impl, "grad_checkpoint": ckpt} for impl, ckpt in variants]
    # the N searches (the headline) first, so that a short time limit cuts the batch searches
    order = [(axis, row) for axis in ("frames", "batch") for row in rows]
    deadline_all = time.monotonic() + plan.time_limit
    curves, errors = {}, []
    for done, (axis, row) in enumerate(order):
        impl, ckpt = row["impl"], row["grad_checkpoint"]
        name = f"{impl}{' + grad checkpoint' if ckpt else ''}"
        deadline = time.monotonic() + (deadline_all - time.monotonic()) / (len(order) - done)

        def one(size, axis=axis, impl=impl, ckpt=ckpt, name=name):
            batch, frames = (plan.batch_at, size) if axis == "frames" else (size, plan.frames_at)
            res = probe(impl, ckpt, batch, frames)
            state = "fits" if res.get("ok") else ("out of memory" if res.get("oom") else "error")
            peak = res.get("peak_mb")
            detail = f", peak {peak:.0f} MB" if peak is not None else ""
            if state == "error":
                detail += f" ({res.get('error')})"
                errors.append({"impl": impl, "grad_checkpoint": ckpt, "batch": batch, "frames": frames,
                               "error": res.get("error")})
            log(f"  {name:30s} batch {batch:5d} x N {frames:5d}: {state}{detail}")
            if axis == "frames" and peak is not None:
                curves.setdefault(name, []).append((frames, peak))
            return bool(res.get("ok")), peak

        if axis == "frames":
            search = largest_fitting(one, start=plan.start_frames, limit=plan.max_frames, budget_mb=target_mb,
                                     degree=2, rel_tol=plan.rel_tol, deadline=deadline)
        else:
            search = largest_fitting(one, start=plan.start_batch, limit=plan.max_batch, budget_mb=target_mb,
                                     degree=1, rel_tol=plan.rel_tol, deadline=deadline)
        key = "max_frames" if axis == "frames" else "max_batch"
        row.update({key: search.best, f"{key}_failed": search.failed, f"{key}_exact": search.exact,
                    f"{key}_at_limit": search.at_limit, f"{key}_probes": len(search.probes)})
    for row in rows:  # extra points of the peak-vs-N plot, below each variant's largest N
        name = f"{row['impl']}{' + grad checkpoint' if row['grad_checkpoint'] else ''}"
        for frames in plan.curve_frames:
            have = {n for n, _ in curves.get(name, [])}
            if frames in have or frames > row["max_frames"] or time.monotonic() > deadline_all:
                continue
            res = probe(row["impl"], row["grad_checkpoint"], plan.batch_at, frames)
            if res.get("peak_mb") is not None:
                curves.setdefault(name, []).append((frames, res["peak_mb"]))
                log(f"  {name:30s} batch {plan.batch_at:5d} x N {frames:5d}: curve point, peak {res['peak_mb']:.0f} MB")
    fits = {name: fit_growth(sorted(points)) for name, points in curves.items()}
    return {"setting": asdict(setting), "plan": {k: v for k, v in asdict(plan).items() if k != "setting"},
            "rows": rows, "curves": {k: sorted(v) for k, v in curves.items()}, "growth": fits, "errors": errors}


def format_bound(row: dict, key: str) -> str:
    best = row.get(key)
    if best is None:
        return "-"
    if row.get(f"{key}_at_limit"):
        return f">= {best} (limit)"
    failed = row.get(f"{key}_failed")
    if not row.get(f"{key}_exact"):
        return f"{best}..{failed - 1 if failed else '?'} (time)"
    if failed and failed - 1 > best:
        return f"{best}..{failed - 1}"  # closed to the search's relative tolerance
    return str(best)


def format_table(result: dict) -> str:
    plan = result["plan"]
    lines = [f"{'variant':32s} {'max batch at N=' + str(plan['frames_at']):>22s} "
             f"{'max N at batch ' + str(plan['batch_at']):>22s}"]
    for row in result["rows"]:
        name = f"{row['impl']}{' + grad checkpoint' if row['grad_checkpoint'] else ''}"
        lines.append(f"{name:32s} {format_bound(row, 'max_batch'):>22s} {format_bound(row, 'max_frames'):>22s}")
    by_impl = {(r["impl"], r["grad_checkpoint"]): r for r in result["rows"]}
    for ckpt in sorted({r["grad_checkpoint"] for r in result["rows"]}):
        ref, fused = by_impl.get(("reference", ckpt)), by_impl.get(("fused", ckpt))
        if ref and fused and ref.get("max_frames") and ref.get("max_batch"):
            lines.append(f"fused / reference{' (grad checkpoint)' if ckpt else ''}: "
                         f"batch x{fused['max_batch'] / ref['max_batch']:.2f}, "
                         f"N x{fused['max_frames'] / ref['max_frames']:.2f}"
                         f"{' (fused at the search limit: a lower bound)' if fused.get('max_frames_at_limit') else ''}")
    for name, fit in result.get("growth", {}).items():
        if fit:
            lines.append(f"peak vs N, least squares, {name}: {fit['a_mb']:.1f} {fit['b_mb_per_frame']:+.2f} N "
                         f"{fit['c_mb_per_frame2']:+.4f} N^2 MB (N <= {fit['max_frames_fitted']})")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str | None:
    """PNG of peak memory against N at the fixed batch, one line per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    setting, plan = result["setting"], result["plan"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in sorted(result["curves"].items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    if setting.get("budget_mb"):
        ax.axhline(setting["budget_mb"], color="grey", linestyle="--", linewidth=1, label="budget")
    what = ("whole model" if setting["target"] == "model"
            else f"one NLAM block (C={setting['channels']}, L = N*{setting['height'] * setting['width']})")
    ax.set_title(f"{what}, {setting['height']}x{setting['width']}, batch {plan['batch_at']}, "
                 f"amp {setting['amp']}, {setting['device']}", fontsize=9)
    ax.set_xlabel("frames per clip N")
    ax.set_ylabel("peak memory of one training step (MB)" if setting["target"] == "model"
                  else "peak memory of forward + backward (MB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import json

    _child(json.loads(sys.argv[1]))
