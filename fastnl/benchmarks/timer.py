"""The one timer of ``fastnl bench``: median and 20th/80th percentiles of a function's run time,
and the peak memory of its untimed runs.

:func:`measure` runs ``fn`` ``warmup`` times untimed (compilation, autotuning, lazy state such
as an optimizer's), once more untimed for an estimate of its time, then times it:

- on a GPU with ``triton.testing.do_bench`` (it clears the L2 cache before every run and times
  each run with CUDA events; ``return_mode="all"`` gives every run's time, in triton 3.6 to
  3.9); where Triton is missing or its ``do_bench`` refuses these arguments, with CUDA events
  around each run after the same L2 flush (zeroing a 256 MiB buffer);
- on a CPU, and for host-side work on any device (``clock="host"``), with
  ``torch.utils.benchmark.Timer`` at this process's thread count, in blocks as
  ``blocked_autorange`` times them (it synchronizes CUDA around each block where CUDA is
  present).

The timed runs number at least ``runs`` and last at least ``min_time_s`` in all. :func:`paired`
times several functions in interleaved rounds, for ratios that a drifting machine does not
bias. Peak memory
covers the untimed runs only (do_bench's flush buffer would count otherwise), from a peak mark
reset when ``measure`` starts: on a GPU ``torch.cuda.max_memory_allocated``, on a CPU the
process's peak resident set (``VmHWM``, see :func:`fastnl.benchmarks.peak_rss_mb`), above
``base_mb`` (default: what was allocated, or resident, when ``measure`` started).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastnl.benchmarks import peak_rss_mb, reset_peak_rss_mb, synchronize

QUANTILES = (0.2, 0.8)
L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 cache of any current GPU
HOST_BLOCK_S = 1e-3  # the shortest block of calls timed together on the host clock


@dataclass
class Timing:
    """Seconds per run of one function: the median and the 20th/80th percentiles of ``runs``
    timed runs, by ``timer``; ``peak_mb`` of the untimed runs (None where not measured)."""

    median_s: float
    p20_s: float
    p80_s: float
    runs: int
    timer: str
    peak_mb: float | None = None

    def fields(self, name: str = "", unit: str = "ms") -> dict:
        """Row fields ``{name}{unit}``, ``{name}p20_{unit}``, ``{name}p80_{unit}`` (unit "ms" or "s")."""
        scale = {"ms": 1e3, "s": 1.0}[unit]
        return {f"{name}{unit}": self.median_s * scale, f"{name}p20_{unit}": self.p20_s * scale,
                f"{name}p80_{unit}": self.p80_s * scale}


def quantile(values, q: float) -> float:
    """The ``q`` quantile of ``values``, linear between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(seconds: list[float], timer: str, peak_mb: float | None = None, runs: int | None = None) -> Timing:
    """The Timing of per-run ``seconds`` (``runs``: the calls behind them, default one each)."""
    return Timing(quantile(seconds, 0.5), quantile(seconds, QUANTILES[0]), quantile(seconds, QUANTILES[1]),
                  runs or len(seconds), timer, peak_mb)


def once_s(fn: Callable[[], object], device: str) -> float:
    """Seconds of a single run of ``fn``, the device synchronized on both sides (for work that
    runs exactly once, such as a capacity probe's step)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


@dataclass
class Paired:
    """Seconds of each function in every round of :func:`paired` (``seconds[name][round]``)."""

    seconds: dict
    rounds: int

    def medians(self) -> dict:
        """{name: its median seconds over the rounds}."""
        return {name: quantile(ts, 0.5) for name, ts in self.seconds.items()}

    def speedup(self, engine: str, baseline: str) -> dict:
        """The per-round speed-ups of ``engine`` over ``baseline`` (the baseline's time over the
        engine's, in the same round): their median, 20th/80th percentiles, minimum and maximum."""
        ratios = [b / e for b, e in zip(self.seconds[baseline], self.seconds[engine])]
        return {"median": quantile(ratios, 0.5), "p20": quantile(ratios, QUANTILES[0]),
                "p80": quantile(ratios, QUANTILES[1]), "min": min(ratios), "max": max(ratios),
                "rounds": self.rounds}


def paired(fns: dict, device, rounds: int = 8, warmup: int = 1, seed: int = 0) -> Paired:
    """Time the functions of ``fns`` ({name: fn}) in ``rounds`` rounds: each round runs every one
    once, back to back in a random order (drawn from ``seed``), the device synchronized around
    each run. On a machine whose speed drifts (a shared CPU), the per-round ratio of two of them
    cancels drift that lasts longer than a round, which medians taken one function after the
    other do not."""
    import random

    device = str(device)
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds}, {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    order = random.Random(seed)
    seconds = {name: [] for name in fns}
    for _ in range(rounds):
        for name in order.sample(list(fns), len(fns)):
            seconds[name].append(once_s(fns[name], device))
    return Paired(seconds, rounds)


def measure(fn: Callable[[], object], device, *, warmup: int = 1, runs: int = 5, min_time_s: float = 0.1,
            clock: str = "device", base_mb: float | None = None) -> Timing:
    """Time ``fn()`` on ``device`` (see the module's docstring); ``clock`` "device" or "host"."""
    import torch

    device = str(device)
    if clock not in ("device", "host"):
        raise ValueError(f"clock must be 'device' or 'host', got {clock!r}")
    if warmup < 0 or runs < 1 or min_time_s < 0:
        raise ValueError(f"need warmup >= 0, runs >= 1 and min_time_s >= 0, got {warmup}, {runs}, {min_time_s}")
    on_cuda = device.startswith("cuda")
    if on_cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        start_mb = reset_peak_rss_mb()
    for _ in range(warmup):
        fn()
    estimate = once_s(fn, device)
    if on_cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = peak_rss_mb()
    peak_mb -= start_mb if base_mb is None else base_mb
    budget_s = max(min_time_s, runs * estimate)
    if on_cuda and clock == "device":
        seconds, timer = _cuda_times(fn, device, budget_s, runs)
        return summarize(seconds, timer, peak_mb)
    seconds, number = _host_times(fn, budget_s, runs, estimate)
    return summarize(seconds, "torch.utils.benchmark", peak_mb, runs=number * len(seconds))


def _cuda_times(fn, device: str, budget_s: float, runs: int) -> tuple[list[float], str]:
    """Seconds of each timed run on a GPU: do_bench where it serves, else CUDA events."""
    import torch

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        try:
            with torch.cuda.device(device):
                times_ms = do_bench(fn, warmup=0, rep=1.2e3 * budget_s, return_mode="all")
        except (TypeError, AssertionError, AttributeError):  # a do_bench without return_mode="all"
            times_ms = None
        if isinstance(times_ms, (list, tuple)) and times_ms:
            return [t / 1e3 for t in times_ms], "triton.testing.do_bench"
    cache = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    estimate = once_s(fn, device)
    count = max(runs, math.ceil(budget_s / max(estimate, 1e-9)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for start, end in events:
        cache.zero_()
        start.record()
        fn()
        end.record()
    synchronize(device)
    del cache
    return [start.elapsed_time(end) / 1e3 for start, end in events], "cuda events (L2 flushed)"


def _host_times(fn, budget_s: float, runs: int, estimate: float) -> tuple[list[float], int]:
    """Seconds per call of each timed block on the host clock, and the calls per block.

    ``torch.utils.benchmark.Timer.timeit`` in blocks of at least 1 ms (one call per block for
    anything slower), until ``runs`` blocks and ``budget_s`` seconds: the scheme of
    ``blocked_autorange`` with the block size taken from the estimate (its own sizing runs a
    20 ms function 10 times per block)."""
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    number = max(1, math.ceil(HOST_BLOCK_S / max(estimate, 1e-9)))
    # the block timer blocked_autorange runs (the public timeit() adds two warm-up calls each time)
    block = getattr(timer, "_timeit", None) or (lambda n: timer.timeit(n).raw_times[0])
    raw: list[float] = []
    while len(raw) < runs or sum(raw) < budget_s:
        raw.append(block(number))
    return [t / number for t in raw], number
