"""Benchmarks of ``fastnl bench``: a registry of suites and the measuring helpers they share.

A suite is a function ``run(device, quick=False) -> list[dict]`` (one dict per table row).
A suite that builds its list with :func:`live_rows` reports each row the moment it is appended
to the sink installed by :func:`row_sink` (``fastnl bench --json`` rewrites its file then, so
a run stopped half-way keeps every row measured so far).
Every time comes from one timer, :mod:`fastnl.benchmarks.timer` (``triton.testing.do_bench`` on
a GPU, ``torch.utils.benchmark`` on a CPU): the median and the 20th/80th percentiles. Peak
memory is ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU it is the process's peak
resident set (``VmHWM`` on Linux, reset when the measurement starts) above its size before the work, measured in a fresh subprocess per
variant so that one variant's peak cannot hide another's.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator

from fastnl.vocabulary import MODEL_IMPLS

# name -> "module:run:table": the suite's function and the one that prints its rows (each suite
# owns its columns); attention and channel are the kernels' own microbenchmarks.
SUITES = {
    "attention": "fastnl.benchmarks.attention:run:format_table",
    "channel": "fastnl.benchmarks.channel:run:format_table",
    "nlam": "fastnl.benchmarks.model:run_nlam:format_table",
    "model": "fastnl.benchmarks.model:run_model:format_table",
    "configs": "fastnl.benchmarks.attention:run_configs:format_configs",
    "memory": "fastnl.benchmarks.memory:run:format_table",
    "step-cost": "fastnl.benchmarks.step_cost:run:format_table",
    "loader": "fastnl.benchmarks.loader:run:format_table",
}
RESULT_PREFIX = "FASTNL_RESULT "
# The model's implementations as the suites compare them: the baseline (reference) first.
BENCH_IMPLS = tuple(sorted(MODEL_IMPLS, key=lambda impl: impl != "reference"))
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str, part: int) -> Callable:
    module_name, *funcs = SUITES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise ImportError(f"{module_name} is not part of this checkout") from err
        raise
    return getattr(module, funcs[part])


def load_suite(name: str) -> Callable:
    """The ``run`` function of suite ``name``; ImportError when its module is not there."""
    return _load(name, 0)


def load_table(name: str) -> Callable[[list], str]:
    """The function that prints the rows of suite ``name`` as its table."""
    return _load(name, 1)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


def generic_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain table of dict rows: ``columns``, or the union of their keys in first-seen order."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


_row_sinks: list[Callable[[dict], None]] = []


class LiveRows(list):
    """A suite's list of rows: every row appended is also handed to the current sink."""

    def append(self, row) -> None:
        super().append(row)
        if _row_sinks:
            _row_sinks[-1](row)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)


def live_rows() -> list:
    """An empty list of rows for a suite to fill (see :class:`LiveRows`)."""
    return LiveRows()


@contextlib.contextmanager
def row_sink(fn: Callable[[dict], None]) -> Iterator[None]:
    """Within the block, ``fn(row)`` is called for every row a suite appends to a live list."""
    _row_sinks.append(fn)
    try:
        yield
    finally:
        _row_sinks.remove(fn)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)`` where there is one (Linux): free heap pages back to the system."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def reset_peak_rss_mb() -> float:
    """Start a measurement: reset the peak-RSS mark to the current size (Linux, via
    /proc/self/clear_refs) so transient peaks before it (imports, set-up) do not count, and
    return the current resident size in MB.

    It first imports torch._dynamo: the first call of any ``torch.library`` op in a process
    imports it (about 150 MB of resident modules and 2 s on a CPU), which would otherwise land
    in the first measured peak instead of the op's own memory. It also collects garbage and
    hands the allocator's free memory back to the system (glibc's ``malloc_trim``) first: memory
    freed before the measurement but still resident would otherwise be counted in the start and
    could be returned during it, making the measured peak smaller than the variant's own."""
    import gc

    import torch._dynamo  # noqa: F401

    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return current_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process.

    On Linux the high-water mark of this program's own address space (``VmHWM``): ``ru_maxrss``
    also carries over the peak of the process it was forked from (Linux records the old address
    space's peak at exec), so a child of a large parent would report the parent's peak. Elsewhere
    ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def emit(result: dict) -> None:
    """Print a subprocess's result as one line its parent picks out of the output."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_subprocess(module: str, payload: dict, *, timeout: float | None = None,
                   env: dict | None = None) -> dict:
    """Run ``python -m module '<payload json>'`` and return the dict it emitted.

    The child sees the repository root on PYTHONPATH (the package need not be installed).
    Without a result line the returned dict has ``ok: False``, the exit code and the tail of
    its output (a crash, a kill by the OS, a timeout).
    """
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, child_env.get("PYTHONPATH")) if p)
    # A fixed mmap threshold: glibc then returns every freed buffer above 64 KiB to the OS at
    # once, so the resident size follows the live tensors and ru_maxrss is their peak.
    child_env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    cmd = [sys.executable, "-m", module, json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "returncode": None}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "returncode": proc.returncode,
            "error": " | ".join(tail) or f"exit code {proc.returncode}, no output"}
