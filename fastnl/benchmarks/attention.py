"""Benchmark of the NLAM spatial attention: time and peak memory per backend and shape.

GPU (bf16, B=1, L in {1024, 4096, 8192, 16384}, D in {512, 1024}): backends triton / torch /
reference of :func:`fastnl.ops.nl_attention` and every PyTorch SDPA backend on [B, 1, L, D]
(refusals are reported) and the bf16 dense-matmul throughput of the same run. CPU (fp32,
D=512, L up to 8192): the chunked torch path against the reference. TFLOP/s: 4*B*L*L*D
forward, 10*B*L*L*D backward. ``run_configs`` (suite ``configs``) times every Triton
configuration the autotuner may pick; ``kernel_resources`` gives their sm_90 registers, stack
and shared memory.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch

from fastnl import ops
from fastnl.benchmarks import live_rows

GPU_LENGTHS = (1024, 4096, 8192, 16384)
GPU_HEAD_DIMS = (512, 1024)
CPU_LENGTHS = (1024, 2048, 4096, 8192)
FASTNL_BACKENDS = ("triton", "torch", "reference")


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return [(f"sdpa_{n.lower()}", getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _attention_fn(backend: str, sdpa_backend=None):
    """f(q, k, v) for q, k, v [B, L, D]."""
    if sdpa_backend is None:
        return lambda q, k, v: ops.nl_attention(q, k, v, scale=1.0 / q.shape[-1] ** 0.5, backend=backend)

    def sdpa(q, k, v):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0 / q.shape[-1] ** 0.5)
        return out.squeeze(1)

    return sdpa


def _timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def measure(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return measure


def time_attention(fn, B: int, L: int, D: int, dtype: torch.dtype, device: torch.device, reps: int,
                   modes: tuple = ("fwd", "fwd_bwd")) -> dict:
    """Median forward and/or forward+backward seconds of ``fn`` (``modes``), TFLOP/s and peak
    extra memory (CUDA only)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, 3 * D, L, generator=gen).to(device=device, dtype=dtype)
    q, k, v = [t.transpose(1, 2).detach().requires_grad_() for t in x.chunk(3, dim=1)]
    grad = torch.randn(B, L, D, generator=gen).to(device=device, dtype=dtype)
    measure = _timer(device)

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    result = {}
    steps = {"fwd": forward, "fwd_bwd": forward_backward}
    for name in modes:
        step = steps[name]
        step()  # warm-up (compilation, autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = [measure(step) for _ in range(reps)]
        result[f"{name}_s"] = statistics.median(times)
        if device.type == "cuda":
            result[f"{name}_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    flops = {"fwd": 4 * B * L * L * D, "fwd_bwd": 14 * B * L * L * D}
    for name in modes:
        result[f"{name}_tflops"] = flops[name] / result[f"{name}_s"] / 1e12
    return result


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 dense n x n x n matmul throughput, the yardstick of the forward target."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    measure = _timer(device)
    torch.mm(a, b)
    return 2 * n**3 / statistics.median(measure(lambda: torch.mm(a, b)) for _ in range(reps)) / 1e12


def kernel_resources(head_dims=GPU_HEAD_DIMS) -> list[dict]:
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
    """Peak resident memory (MB) that fp32 forward+backward at [1, L, D] adds, in a fresh process."""
    script = f"""
import torch
from fastnl import ops
from fastnl.benchmarks import peak_rss_mb, reset_peak_rss_mb
q, k, v = [torch.randn(1, {L}, {D}, requires_grad=True) for _ in range(3)]
torch.ones(1)
base = reset_peak_rss_mb()
ops.nl_attention(q, k, v, scale={D ** -0.5}, backend={backend!r}).sum().backward()
print(peak_rss_mb() - base)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def run(device, quick: bool = False) -> list[dict]:
    """One dict per (backend, L, D): seconds, TFLOP/s, peak memory, or the reason it was refused."""
    device = torch.device(device)
    rows = live_rows()
    if device.type == "cuda":
        lengths = GPU_LENGTHS[:2] if quick else GPU_LENGTHS
        rows.append({"kind": "matmul", "dtype": "bf16", "tflops": matmul_tflops(device)})
        for D in GPU_HEAD_DIMS:
            for L in lengths:
                cases = [(b, _attention_fn(b)) for b in FASTNL_BACKENDS]
                cases += [(name, _attention_fn("sdpa", sb)) for name, sb in _sdpa_backends()]
                for name, fn in cases:
                    label = {"kind": "attention", "backend": name, "B": 1, "L": L, "D": D, "dtype": "bf16"}
                    rows.append(_run_case(fn, label, 1, L, D, torch.bfloat16, device, 3 if quick else 10))
                    row = rows[-1]
                    print(f"  attention {name} L={L} D={D}: " + (
                        f"refused ({row['refused']})" if "refused" in row else
                        f"fwd {1e3 * row['fwd_s']:.3f} ms, fwd+bwd {1e3 * row['fwd_bwd_s']:.3f} ms"),
                        file=sys.stderr, flush=True)
        return rows
    lengths = (256, 1024) if quick else CPU_LENGTHS
    D = 128 if quick else 512
    for L in lengths:
        for backend in ("torch", "reference"):
            label = {"kind": "attention", "backend": backend, "B": 1, "L": L, "D": D, "dtype": "fp32"}
            row = _run_case(_attention_fn(backend), label, 1, L, D, torch.float32, device, 1 if quick else 3)
            if not quick:
                row["peak_rss_growth_mb"] = cpu_peak_rss_mb(backend, L, D)
            rows.append(row)
    return rows


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
    if device.type != "cuda" and not (quick and os.environ.get("TRITON_INTERPRET") == "1"):
        return [{"kind": "config", "skipped": "needs a CUDA device (or TRITON_INTERPRET=1 with --quick)"}]
    shapes = CONFIG_SHAPES[:2] if quick else CONFIG_SHAPES
    dtype, reps, batch = torch.bfloat16, 5 if quick else 20, 2
    if device.type != "cuda":
        shapes, reps, batch = ((48, 32),), 1, 1
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
                    row = _run_case(fn, label, batch, L, D, dtype, device, reps, modes=(mode,))
                if "refused" not in row:
                    row = {**label, "timed": mode.replace("_", "+"), "ms": 1e3 * row[f"{mode}_s"],
                           "tflops": row[f"{mode}_tflops"]}
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

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for row in run(device, quick="--quick" in sys.argv):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
