"""Benchmark of the NLAM spatial attention: time and peak memory per engine and shape, beside
what a user would otherwise run.

Engines (``fastnl.ops.nl_attention`` backends): ``triton`` (flash), ``chunked`` (tensor-core
GEMMs + Triton row kernels), ``torch`` (the chunked engine in PyTorch ops), and ``auto``'s
choice with its reason. Fair baselines: ``plain`` (bmm, softmax, bmm as written in PyTorch,
under autocast in the input dtype) and ``sdpa-<backend>`` (``F.scaled_dot_product_attention``
restricted to one backend, on contiguous [B, 1, L, D] copies made inside the timed function:
its fused backends refuse the conv's channel-first views; "refused" where a backend refuses).
The float32 ``reference`` is the numerics ground truth and is not timed. Every speed-up is an
engine's time over the fastest fair baseline that ran at that shape, side by side in one run.

GPU (bf16, channel-first q/k/v): the model's shapes (L, D) = (1024, 512), (256, 1024) at
batch 8 and 32, and (8192, 512) at batch 8; where the score matrix is more than one tile, also
the variant ``chunked-keep`` (P of the leading blocks kept: does it pay on a GPU?).
CPU (fp32, D=512, L up to 8192): the torch engine against plain and every SDPA backend (on a CPU flash and math run, efficient and cuDNN refuse),
each timed on its own with its peak resident memory, then the engine and every baseline that
ran in 8 interleaved rounds (``paired_s``: each one's median forward + backward there):
``fwd_bwd_paired_speedup`` is the median per-round speed-up over ``paired_vs``, the baseline
fastest in those rounds (a shared CPU's speed drifts between rows).
TFLOP/s count the useful flops: 4*B*L*L*D forward, 14*B*L*L*D forward + backward.
``run_configs`` (suite ``configs``) times every Triton configuration the autotuner may pick;
``kernel_resources`` gives their sm_90 registers, stack and shared memory.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from fastnl import ops
from fastnl.benchmarks import generic_table, live_rows, timer
from fastnl.vocabulary import ATTENTION_ENGINES, triton_interpreted

# (B, L, D): the model's attention at N=8 frames after layer3 and layer4 at batch 8, a 64-frame
# clip after layer3, then batch 32 (in this order: a time cap cuts the last)
GPU_SHAPES = ((8, 1024, 512), (8, 256, 1024), (8, 8192, 512), (32, 1024, 512), (32, 256, 1024))
QUICK_GPU_SHAPES = ((8, 1024, 512), (8, 256, 1024))
CPU_LENGTHS = (1024, 2048, 4096, 8192)
CPU_PAIRED_ROUNDS = 8
# Untimed runs before a CPU measurement: glibc's malloc raises its mmap threshold as large
# blocks are freed, so the first few calls of a backend fault in fresh pages (SDPA's math
# backend: 3 calls at 3x its steady time at L = 1024)
CPU_WARMUP = 3
ENGINES = ATTENTION_ENGINES
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _sdpa_backends() -> list[str]:
    """The ``sdpa-<backend>`` names this torch has a backend for (run or refused, each its own row)."""
    from torch.nn.attention import SDPBackend

    return [name for name, member in SDPA_BACKENDS.items() if hasattr(SDPBackend, member)]


def fair_baselines() -> list[str]:
    """What a user would otherwise run: ``plain`` and every ``sdpa-<backend>`` this torch has."""
    return ["plain", *_sdpa_backends()]


def _attention_fn(name: str):
    """f(q, k, v) for q, k, v [B, L, D]: an ``nl_attention`` backend ("plain" under autocast in
    q's dtype), or, for ``sdpa-<backend>``, SDPA restricted to that backend on contiguous
    [B, 1, L, D] copies (made inside f, so their time counts)."""
    if name in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_backend = getattr(SDPBackend, SDPA_BACKENDS[name])

        def sdpa(q, k, v):
            with sdpa_kernel(sdpa_backend):
                out = torch.nn.functional.scaled_dot_product_attention(
                    *(t.unsqueeze(1).contiguous() for t in (q, k, v)), scale=1.0 / q.shape[-1] ** 0.5)
            return out.squeeze(1)

        return sdpa

    def engine(q, k, v):
        scale = 1.0 / q.shape[-1] ** 0.5
        if name != "plain" or q.dtype == torch.float32:
            return ops.nl_attention(q, k, v, scale=scale, backend=name)
        with torch.autocast(q.device.type, dtype=q.dtype):
            return ops.nl_attention(q, k, v, scale=scale, backend="plain")

    return engine


def attention_steps(fn, B: int, L: int, D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """{"fwd": forward without gradients, "fwd_bwd": forward + backward} of ``fn`` on q, k, v
    viewing one [B, 3D, L] conv output channel-first (seed 0: every backend sees the same inputs)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, 3 * D, L, generator=gen).to(device=device, dtype=dtype)
    q, k, v = [t.transpose(1, 2).detach().requires_grad_() for t in x.chunk(3, dim=1)]
    grad = torch.randn(B, L, D, generator=gen).to(device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    return {"fwd": forward, "fwd_bwd": forward_backward}


def paired_rounds(backends, B: int, L: int, D: int, dtype: torch.dtype, device: torch.device, rounds: int,
                  seed: int = 0, warmup: int = 1) -> timer.Paired:
    """Forward + backward of each backend in interleaved rounds (:func:`fastnl.benchmarks.timer.paired`)."""
    steps = {name: attention_steps(_attention_fn(name), B, L, D, dtype, device)["fwd_bwd"] for name in backends}
    return timer.paired(steps, device, rounds=rounds, seed=seed, warmup=warmup)


def paired_speedup(engine: str, baselines: list[str], B: int, L: int, D: int, dtype: torch.dtype,
                   device: torch.device, rounds: int) -> tuple[dict, dict]:
    """:func:`paired_rounds` of ``engine`` and ``baselines``: the fields of the engine's row,
    ``paired_vs`` (the baseline of the smallest median time over the rounds),
    ``fwd_bwd_paired_speedup`` (the median per-round speed-up of ``engine`` over it),
    ``paired_p20``, ``paired_p80``, ``paired_rounds``; and {backend: its median seconds over the rounds}."""
    result = paired_rounds((engine, *baselines), B, L, D, dtype, device, rounds, warmup=CPU_WARMUP)
    medians = result.medians()
    fastest = min(baselines, key=medians.get)
    s = result.speedup(engine, fastest)
    return ({"paired_vs": fastest, "fwd_bwd_paired_speedup": s["median"], "paired_p20": s["p20"],
             "paired_p80": s["p80"], "paired_rounds": s["rounds"]}, medians)


def _chunked_keeping(keep: int):
    """f(q, k, v): the chunked engine (Triton row kernels) keeping the P of its leading query
    blocks within ``keep`` elements, whose S its backward then does not recompute."""
    from fastnl.attention_chunked import nl_attention_chunked

    def chunked_keep(q, k, v):
        return nl_attention_chunked(q, k, v, 1.0 / q.shape[-1] ** 0.5, rowwise="triton", keep=keep)

    return chunked_keep


def gpu_cases(B: int, L: int, D: int) -> list[tuple]:
    """(name, role, f, extra label fields) of each row of a GPU shape: the engines, the fair
    baselines, and, where the CUDA default keeps no P (the score matrix is more than one tile),
    the variant ``chunked-keep`` that keeps 4 B L D elements of it (as much as q, k, v and O
    hold): whether skipping the backward's recomputation of S pays on a GPU."""
    from fastnl.attention_chunked import kept_fraction

    cases = [(b, "engine", _attention_fn(b), {}) for b in ENGINES]
    cases += [(name, "baseline", _attention_fn(name), {}) for name in fair_baselines()]
    if kept_fraction(L, D, B, "cuda") < 1:
        keep = 4 * B * L * D
        cases.append(("chunked-keep", "variant", _chunked_keeping(keep), {"keep_elements": keep}))
    return cases


def time_attention(fn, B: int, L: int, D: int, dtype: torch.dtype, device: torch.device, reps: int,
                   modes: tuple = ("fwd", "fwd_bwd"), min_time_s: float = 0.1, warmup: int = 1) -> dict:
    """Median and 20th/80th percentile seconds of ``fn``'s forward and/or forward+backward
    (``modes``; ``warmup`` untimed and at least ``reps`` timed runs each, see
    :mod:`fastnl.benchmarks.timer`), TFLOP/s
    at the median and peak extra memory (CUDA only)."""
    result = {}
    steps = attention_steps(fn, B, L, D, dtype, device)
    flops = {"fwd": 4 * B * L * L * D, "fwd_bwd": 14 * B * L * L * D}
    for name in modes:
        timing = timer.measure(steps[name], device, warmup=warmup, runs=reps, min_time_s=min_time_s)
        result.update(timing.fields(f"{name}_", unit="s"))
        result["timer"] = timing.timer
        if device.type == "cuda":
            result[f"{name}_peak_extra_mb"] = timing.peak_mb
    for name in modes:
        result[f"{name}_tflops"] = flops[name] / result[f"{name}_s"] / 1e12
    return result


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 dense n x n x n matmul throughput at the median time, the yardstick of the forward target."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timer.measure(lambda: torch.mm(a, b), device, runs=reps).median_s / 1e12


def kernel_resources(head_dims=(512, 1024)) -> list[dict]:
    """REG / STACK / shared of every Triton configuration compiled for sm_90 (in a subprocess)."""
    import json

    from fastnl._paths import REPO_ROOT

    script = ("import importlib, sys\nfrom fastnl._paths import import_kernels\nimport_kernels()\n"
              "importlib.import_module('fastnl.kernels.aot').main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", script, "--head-dims", *map(str, head_dims)], cwd=REPO_ROOT,
                          env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"kind": "resources", "error": proc.stderr.strip().splitlines()[-1:]}]
    return [{"kind": "resources", **json.loads(line)} for line in proc.stdout.splitlines() if line.startswith("{")]


def _run_case(fn, label: dict, *args, **kwargs) -> dict:
    try:
        return {**label, **time_attention(fn, *args, **kwargs)}
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if args[-2].type == "cuda":
            torch.cuda.empty_cache()
        return {**label, "refused": str(err).strip().splitlines()[0][:200]}


def cpu_peak_rss_mb(backend: str, L: int, D: int) -> float:
    """Peak resident memory (MB) that fp32 forward+backward at [1, L, D] of a backend (an engine,
    ``plain`` or ``sdpa-<backend>``) adds, in a fresh process, on the channel-first q, k, v that
    the timed rows see (:func:`attention_steps`; SDPA's contiguous copies count). A tiny call of the same backend runs
    first, so that one-time costs (the first call of a ``torch.library`` op imports torch._dynamo:
    about 150 MB of modules) stay out of it."""
    script = f"""
import torch
from fastnl.benchmarks import peak_rss_mb, reset_peak_rss_mb
from fastnl.benchmarks.attention import _attention_fn, attention_steps
fn, cpu = _attention_fn({backend!r}), torch.device("cpu")
attention_steps(fn, 1, 16, 16, torch.float32, cpu)["fwd_bwd"]()
step = attention_steps(fn, 1, {L}, {D}, torch.float32, cpu)["fwd_bwd"]
base = reset_peak_rss_mb()
step()
print(peak_rss_mb() - base)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def _log(row: dict) -> None:
    if "refused" in row:
        text = f"refused ({row['refused']})"
    else:
        text = f"fwd {1e3 * row['fwd_s']:.3f} ms, fwd+bwd {1e3 * row['fwd_bwd_s']:.3f} ms"
    print(f"  attention {row['backend']} B={row['B']} L={row['L']} D={row['D']}: {text}", file=sys.stderr, flush=True)


def compare_to_baselines(rows: list[dict]) -> None:
    """Per shape: the fastest fair baseline (``vs`` names it), each row's speed-up over it
    (forward and forward+backward; > 1: faster) and its peak extra memory over plain's."""
    shapes = {(r["B"], r["L"], r["D"], r["dtype"]) for r in rows if r.get("kind") == "attention"}
    for shape in shapes:
        group = [r for r in rows if r.get("kind") == "attention" and (r["B"], r["L"], r["D"], r["dtype"]) == shape]
        ran = [r for r in group if r.get("role") == "baseline" and "refused" not in r]
        plain = next((r for r in ran if r["backend"] == "plain"), None)
        for mode in ("fwd", "fwd_bwd"):
            timed = [r for r in ran if f"{mode}_s" in r]
            if not timed:
                continue
            best = min(timed, key=lambda r: r[f"{mode}_s"])
            for r in group:
                if f"{mode}_s" in r:
                    r[f"{mode}_vs"] = best["backend"]
                    r[f"{mode}_speedup"] = best[f"{mode}_s"] / r[f"{mode}_s"]
        for r in group:
            key = "fwd_bwd_peak_extra_mb"
            if plain and plain.get(key) and r.get(key) is not None:
                r["memory_vs_plain"] = r[key] / plain[key]


def run(device, quick: bool = False) -> list[dict]:
    """One dict per (backend, shape): seconds, TFLOP/s, peak memory, speed-up over the fastest
    fair baseline, or the reason it was refused; and one ``auto`` row per shape (its choice and why)."""
    device = torch.device(device)
    rows = live_rows()
    if device.type == "cuda":
        rows.append({"kind": "matmul", "dtype": "bf16", "tflops": matmul_tflops(device)})
        reps = 3 if quick else 10
        for B, L, D in (QUICK_GPU_SHAPES if quick else GPU_SHAPES):
            chosen, why = ops.explain_auto_backend("cuda", torch.bfloat16, D, L, device)
            rows.append({"kind": "auto", "B": B, "L": L, "D": D, "dtype": "bf16", "backend": chosen, "why": why})
            print(f"  auto at B={B} L={L} D={D}: {chosen} ({why})", file=sys.stderr, flush=True)
            for name, role, fn, extra in gpu_cases(B, L, D):
                label = {"kind": "attention", "backend": name, "role": role, "B": B, "L": L, "D": D, "dtype": "bf16",
                         **extra}
                rows.append(_run_case(fn, label, B, L, D, torch.bfloat16, device, reps))
                _log(rows[-1])
        compare_to_baselines(rows)
        return rows
    lengths = (256, 1024) if quick else CPU_LENGTHS
    D = 128 if quick else 512
    cases = [("torch", "engine")] + [(name, "baseline") for name in fair_baselines()]
    for L in lengths:
        shape_rows = []
        for backend, role in cases:
            label = {"kind": "attention", "backend": backend, "role": role, "B": 1, "L": L, "D": D, "dtype": "fp32"}
            row = _run_case(_attention_fn(backend), label, 1, L, D, torch.float32, device, 3, warmup=CPU_WARMUP)
            if not quick and "refused" not in row:
                row["peak_rss_growth_mb"] = cpu_peak_rss_mb(backend, L, D)
            rows.append(row)
            shape_rows.append(row)
            _log(row)
        # a shared CPU drifts: the speed-up also from rounds that run every backend back to back
        engine_row, ran = shape_rows[0], [r["backend"] for r in shape_rows[1:] if "refused" not in r]
        if "refused" not in engine_row and ran:
            fields, medians = paired_speedup("torch", ran, 1, L, D, torch.float32, device,
                                             rounds=3 if quick else CPU_PAIRED_ROUNDS)
            engine_row.update(fields)
            for r in shape_rows:  # each backend's median forward + backward over those rounds
                if r["backend"] in medians:
                    r["paired_s"] = medians[r["backend"]]
    compare_to_baselines(rows)
    return rows


def measured_engine_table(rows: list[dict], environment: dict | None = None) -> dict:
    """An engine table for ``auto`` (``FASTNL_ENGINE_TABLE``) from GPU attention rows: per (dtype,
    D, L) the engine fastest at forward + backward (at the largest batch measured there)."""
    best: dict = {}
    for r in rows:
        if r.get("kind") != "attention" or r.get("role") != "engine" or "fwd_bwd_s" not in r:
            continue
        key = (r["dtype"], r["D"], r["L"])
        if key in best and best[key]["B"] > r["B"]:
            continue
        entry = best.setdefault(key, {"dtype": r["dtype"], "D": r["D"], "L": r["L"], "B": r["B"], "measured_ms": {}})
        if entry["B"] < r["B"]:
            entry.update(B=r["B"], measured_ms={})
        entry["measured_ms"][r["backend"]] = round(1e3 * r["fwd_bwd_s"], 4)
    entries = []
    for entry in best.values():
        entry["engine"] = min(entry["measured_ms"], key=entry["measured_ms"].get)
        entries.append(entry)
    env = environment or {}
    capability = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    return {"source": f"measured on {env.get('device_name', 'this GPU')} (fastnl bench attention, forward + backward)",
            "capability": capability, "entries": sorted(entries, key=lambda e: (e["dtype"], e["D"], e["L"]))}


def format_table(rows: list[dict]) -> str:
    """The attention suite's table: matmul yardstick, ``auto``'s choices, one line per backend and shape."""
    lines = [f"auto at B={r['B']} L={r['L']} D={r['D']}: {r['backend']} ({r['why']})" for r in rows if r["kind"] == "auto"]
    columns = ["backend", "role", "B", "L", "D", "dtype", "keep_elements", "fwd_s", "fwd_bwd_s", "fwd_bwd_p20_s", "fwd_bwd_p80_s",
               "paired_s", "fwd_bwd_tflops",
               "fwd_bwd_peak_extra_mb", "fwd_bwd_vs", "fwd_speedup", "fwd_bwd_speedup", "paired_vs",
               "fwd_bwd_paired_speedup", "paired_p20", "paired_p80", "memory_vs_plain",
               "peak_rss_growth_mb", "refused"]
    table = [r for r in rows if r["kind"] == "attention"]
    present = [c for c in columns if any(c in r for r in table)]
    extra = [generic_table([r]) for r in rows if r["kind"] == "matmul"]
    return "\n".join(extra + lines + [generic_table(table, present)])


CONFIG_COLUMNS = ["kernel", "L", "D", "B", "BLOCK_M", "BLOCK_N", "BLOCK_DV", "warps", "stages", "recompute", "default",
                  "timed", "ms", "p20_ms", "p80_ms", "tflops", "vs_default", "refused", "skipped"]


def format_configs(rows: list[dict]) -> str:
    """The configs suite's table: one line per Triton configuration and shape."""
    return generic_table(rows, [c for c in CONFIG_COLUMNS if any(c in r for r in rows)])


# The model's attention shapes at the paper's N=8 (after layer3: L = 128 N, D = 512; after
# layer4: L = 32 N, D = 1024) and a long clip (N = 64 after layer3).
CONFIG_SHAPES = ((1024, 512), (256, 1024), (8192, 512))


def run_configs(device, quick: bool = False) -> list[dict]:
    """Every configuration the autotuner may pick, timed on its own (bf16, B=2, channel-first
    q/k/v). A forward configuration is timed on the forward alone; a dkdv or dq configuration on
    forward + backward with the other kernels at their default configurations, so within one
    kernel and shape the rows differ only by that kernel's configuration. Needs a GPU (or, for
    checking the sweep itself, TRITON_INTERPRET=1 and ``quick``, on a tiny shape)."""
    from fastnl._paths import import_kernels

    device = torch.device(device)
    nla = import_kernels().nl_attention
    if device.type != "cuda" and not (quick and triton_interpreted()):
        return [{"kind": "config", "skipped": "needs a CUDA device (or TRITON_INTERPRET=1 with --quick)"}]
    shapes = CONFIG_SHAPES[:2] if quick else CONFIG_SHAPES
    dtype, reps, batch, timing = torch.bfloat16, 5 if quick else 20, 2, {}
    if device.type != "cuda":  # interpreted: nothing to warm up, one timed run
        shapes, reps, batch, timing = ((48, 32),), 1, 1, {"warmup": 0, "min_time_s": 0.0}
    rows = live_rows()
    fn = _attention_fn("triton")
    for L, D in shapes:
        defaults = {kernel: nla.default_config(kernel, D, dtype) for kernel in ("fwd", "dkdv", "dq")}
        for kernel, default in defaults.items():
            mode = "fwd" if kernel == "fwd" else "fwd_bwd"
            for config in nla.candidate_configs(kernel, D, L, dtype=dtype):
                meta = config.kwargs
                label = {"kind": "config", "kernel": kernel, "L": L, "D": D, "B": batch,
                         "BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"], "BLOCK_DV": meta["BLOCK_DV"],
                         "warps": config.num_warps, "stages": config.num_stages,
                         "recompute": nla.recompute_factor(D, meta["BLOCK_DV"]),
                         "default": (meta, config.num_warps, config.num_stages)
                         == (default.kwargs, default.num_warps, default.num_stages)}
                # the other kernels at their defaults: no autotuning between the rows
                with nla.forced_configs(**{**defaults, kernel: config}):
                    row = _run_case(fn, label, batch, L, D, dtype, device, reps, modes=(mode,), **timing)
                if "refused" not in row:
                    row = {**label, "timed": mode.replace("_", "+"), "ms": 1e3 * row[f"{mode}_s"],
                           "p20_ms": 1e3 * row[f"{mode}_p20_s"], "p80_ms": 1e3 * row[f"{mode}_p80_s"],
                           "tflops": row[f"{mode}_tflops"], "timer": row["timer"]}
                rows.append(row)
                print(f"  config {kernel} L={L} D={D} {meta} w{config.num_warps} s{config.num_stages}: "
                      f"{row.get('ms', float('nan')):.3f} ms {row.get('refused', '')}",
                      file=sys.stderr, flush=True)
    # time of each configuration over the default's, per kernel and shape (< 1: faster)
    defaults = {(r["kernel"], r["L"], r["D"]): r["ms"] for r in rows if r.get("default") and "ms" in r}
    for r in rows:
        base = defaults.get((r.get("kernel"), r.get("L"), r.get("D")))
        if base and "ms" in r:
            r["vs_default"] = r["ms"] / base
    return rows


def main() -> None:
    import json

    from fastnl.runtime import default_device

    device = str(default_device())
    for row in run(device, quick="--quick" in sys.argv):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
