"""Benchmarks of the whole NLAM block and of a training step of the whole model, fused vs reference.

``run_nlam(device, quick)``: forward + backward of one NLAM (``fastnl.model.NLAM``) on the frame
maps after layer3 (C=1024, 16x8 at 256x128) and layer4 (C=2048, 8x4), N=8 frames, and on long
clips (N=32 after layer3, L=4096) where the reference's L x L matrices dominate.
``run_model(device, quick)``: one training step (forward, ReIDLoss, backward, Adam) of
``build_model(impl=...)`` at the paper's setting (32 clips x 8 frames, 256x128) and on long clips;
on CUDA the paper's setting runs each model in both memory formats (contiguous and
channels_last) and its row compares the fastest of each (``reference_format``,
``fused_format`` say which; every format's time is in the row's JSON).
On a CPU both run scaled down (fewer frames and clips, lower resolution), as printed in each row.

Both variants of a row run in the same AMP mode (bf16 autocast on CUDA, none on CPU). A row
holds the medians and their 20th/80th percentiles (:mod:`fastnl.benchmarks.timer`), the
speed-up (reference median / fused median), the peak memories and their ratio (reference /
fused). On CUDA the variants run in this process with ``torch.cuda.max_memory_allocated``; on a
CPU each runs in its own subprocess and its peak is the process's peak resident set (see
:func:`fastnl.benchmarks.peak_rss_mb`) above its resident size before the model and inputs were
built; both over the untimed steps.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

from fastnl.benchmarks import BENCH_IMPLS, emit, generic_table, live_rows, reset_peak_rss_mb, run_subprocess, timer

IMPLS = BENCH_IMPLS


@dataclass
class Case:
    """One benchmark configuration; ``kind`` is "nlam" or "model"."""

    kind: str
    label: str
    batch: int
    frames: int
    height: int
    width: int
    channels: int = 0  # nlam: channels of the frame maps (height x width is the map size)
    amp: str = "off"  # "off", "bf16" or "fp16"
    grad_checkpoint: bool = False
    warmup: int = 1
    repeat: int = 5
    # model: the memory format of the model's weights (and so of its activations) in a step,
    # and the formats a row measures each impl in (its time is the fastest of them)
    memory_format: str = "contiguous"
    formats: tuple = ("contiguous",)

    def shape(self) -> str:
        if self.kind == "nlam":
            return f"[{self.batch}*{self.frames},{self.channels},{self.height},{self.width}]"
        return f"{self.batch}x{self.frames}x3x{self.height}x{self.width}"

    def length(self) -> int:
        """L of the attention: N*H*W of the NLAM input (nlam) or of the layer3 map (model)."""
        if self.kind == "nlam":
            return self.frames * self.height * self.width
        return self.frames * (self.height // 16) * (self.width // 16)


def _amp_dtype(amp: str):
    from fastnl.runtime import resolve_amp

    return resolve_amp(amp, "cpu")  # off, bf16 or fp16: the same on every device


def nlam_step(case: Case, impl: str, device: str):
    """A closure running forward + backward of one NLAM on fixed random frame maps."""
    import torch

    from fastnl import runtime
    from fastnl.model import NLAM

    torch.manual_seed(0)
    module = NLAM(case.channels, impl=impl).to(device).train()
    x = torch.randn(case.batch * case.frames, case.channels, case.height, case.width, device=device,
                    requires_grad=True)
    dtype = _amp_dtype(case.amp)

    def step():
        with runtime.autocast(x.device, dtype):
            out = module(x, case.frames)
        out.float().sum().backward()
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step


def model_step(case: Case, impl: str, device: str, num_classes: int = 625):
    """A closure running one training step (forward, ReIDLoss, backward, Adam) of the model."""
    import torch

    from fastnl import runtime
    from fastnl.losses import ReIDLoss
    from fastnl.model import build_model

    torch.manual_seed(0)
    model = build_model(num_classes, frames=case.frames, impl=impl, verbose=False)
    model = model.to(device, memory_format=MEMORY_FORMATS[case.memory_format]()).train()
    model.set_grad_checkpointing(case.grad_checkpoint)
    on_cuda = device.startswith("cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=on_cuda)
    criterion = ReIDLoss()
    dtype = _amp_dtype(case.amp)
    scaler = runtime.grad_scaler(device, dtype)
    clips = torch.randn(case.batch, case.frames, 3, case.height, case.width, device=device)
    per_id = 4 if case.batch >= 8 else 2  # P x K sampling: K clips per identity
    pids = (torch.arange(case.batch, device=device) // per_id) % num_classes

    def step():
        with runtime.autocast(clips.device, dtype):
            logits, descriptors = model(clips)
            loss, _ = criterion(logits, descriptors, pids)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


BUILDERS = {"nlam": nlam_step, "model": model_step}
# Case.memory_format -> the torch memory format (a function: torch is imported late)
MEMORY_FORMATS = {"contiguous": lambda: __import__("torch").contiguous_format,
                  "channels_last": lambda: __import__("torch").channels_last}
BOTH_FORMATS = tuple(MEMORY_FORMATS)


def attention_flops(case: Case) -> float:
    """FLOPs of the NLAM attention in forward + backward (2 L^2 D each for Q K^T and P V in
    forward; 2.5x that for the pass pair, as in the FlashAttention benchmarks), D = C/2."""
    if case.kind != "nlam":
        return 0.0
    length, dim = case.length(), case.channels // 2
    return 2.5 * 4.0 * case.batch * length * length * dim


def measure(case: Case, impl: str, device: str) -> dict:
    """Median step time with its 20th/80th percentiles (at least ``case.repeat`` timed steps
    after ``case.warmup`` untimed ones) and the peak memory above what was there before the
    variant was built, in this process."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        base_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        base_mb = reset_peak_rss_mb()
    step = BUILDERS[case.kind](case, impl, device)
    timing = timer.measure(step, device, warmup=case.warmup, runs=case.repeat, min_time_s=0.0, base_mb=base_mb)
    del step
    return {"ok": True, **timing.fields(), "runs": timing.runs, "timer": timing.timer, "peak_mb": timing.peak_mb}


def measure_isolated(case: Case, impl: str, device: str, timeout: float | None = None) -> dict:
    """``measure`` in a fresh subprocess (the only way to see a CPU variant's own peak)."""
    import torch

    payload = {"case": asdict(case), "impl": impl, "device": device, "threads": torch.get_num_threads()}
    return run_subprocess("fastnl.benchmarks.model", payload, timeout=timeout)


def _fastest(case: Case, impl: str, device: str) -> tuple[dict, dict]:
    """``impl`` measured in each of ``case.formats``: (the fastest result that ran, with its
    format, or the last failure; every format's result)."""
    on_cuda = device.startswith("cuda")
    per_format = {}
    for fmt in case.formats:
        variant = replace(case, memory_format=fmt)
        per_format[fmt] = (measure(variant, impl, device) if on_cuda
                           else measure_isolated(variant, impl, device))
    ran = [(res["ms"], fmt) for fmt, res in per_format.items() if res.get("ok") and res.get("ms")]
    if not ran:
        return per_format[case.formats[-1]], per_format
    _, fmt = min(ran)
    return {**per_format[fmt], "memory_format": fmt}, per_format


def compare(case: Case, device: str) -> dict:
    """One table row: both impls of ``case``, their speed-up and memory ratio. Where ``case``
    names several memory formats, each impl runs in each and the row holds its fastest (the
    speed-up is the fastest reference's time over the fastest fused one's: what a user of
    either would pick), with every format's time beside it."""
    import torch

    on_cuda = device.startswith("cuda")
    results, per_format = {}, {}
    for impl in IMPLS:
        results[impl], per_format[impl] = _fastest(case, impl, device)
    row = {"suite": case.kind, "case": case.label, "shape": case.shape(), "L": case.length(),
           "amp": case.amp, "grad_checkpoint": case.grad_checkpoint, "device": device,
           "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
           "threads": torch.get_num_threads(), "repeat": case.repeat,
           "memory": "max_memory_allocated" if on_cuda else "peak RSS above start (subprocess, Linux VmHWM)"}
    for impl, res in results.items():
        for key in ("ms", "p20_ms", "p80_ms"):
            row[f"{impl}_{key}"] = res.get(key)
        row.setdefault("timer", res.get("timer"))
        row[f"{impl}_peak_mb"] = res.get("peak_mb")
        if len(case.formats) > 1:
            row[f"{impl}_format"] = res.get("memory_format")
            for fmt, one in per_format[impl].items():
                row[f"{impl}_{fmt}_ms"] = one.get("ms") if one.get("ok") else None
                row[f"{impl}_{fmt}_peak_mb"] = one.get("peak_mb") if one.get("ok") else None
        if not res.get("ok"):
            row[f"{impl}_error"] = res.get("error", "failed")
        flops = attention_flops(case)
        if flops and res.get("ms"):
            row[f"{impl}_attention_tflops"] = flops / (res["ms"] * 1e-3) / 1e12
        if case.kind == "model" and res.get("ms"):
            row[f"{impl}_clips_per_s"] = case.batch / (res["ms"] * 1e-3)
    ok = all(results[i].get("ok") for i in IMPLS)
    row["speedup"] = results["reference"]["ms"] / results["fused"]["ms"] if ok else None
    peaks = [results[i].get("peak_mb") for i in ("reference", "fused")]
    row["memory_ratio"] = peaks[0] / peaks[1] if ok and peaks[0] is not None and (peaks[1] or 0) > 0 else None
    return row


def nlam_cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        reps = dict(warmup=1, repeat=5) if quick else dict(warmup=1, repeat=20)  # do_bench warms up too
        cases = [Case("nlam", "after layer3", 32, 8, 16, 8, channels=1024, amp="bf16", **reps),
                 Case("nlam", "after layer4", 32, 8, 8, 4, channels=2048, amp="bf16", **reps),
                 Case("nlam", "layer3, long clips", 8, 32, 16, 8, channels=1024, amp="bf16", **reps)]
        return cases[:1] + cases[2:] if quick else cases
    if quick:
        return [Case("nlam", "after layer3 (CPU: C/4, 2 clips x 4 frames)", 2, 4, 16, 8, channels=256,
                     warmup=1, repeat=2)]
    return [Case("nlam", "after layer3 (CPU: 2 clips x 4 frames)", 2, 4, 16, 8, channels=1024, warmup=1, repeat=3),
            Case("nlam", "layer3, long clips (CPU: 1 clip x 16 frames)", 1, 16, 16, 8, channels=1024,
                 warmup=1, repeat=3)]


def model_cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        reps = dict(warmup=1, repeat=5) if quick else dict(warmup=1, repeat=10)
        # channels_last at the paper's setting: cuDNN's half-precision convolutions run NHWC,
        # so a user of either model may well train in it (``fastnl train --channels-last``)
        cases = [Case("model", "paper setting", 32, 8, 256, 128, amp="bf16", formats=BOTH_FORMATS, **reps),
                 Case("model", "paper setting, grad checkpoint", 32, 8, 256, 128, amp="bf16",
                      grad_checkpoint=True, **reps),
                 Case("model", "long clips", 8, 64, 256, 128, amp="bf16", **reps)]
        return cases[:1] if quick else cases
    if quick:
        return [Case("model", "training step (CPU: 2 clips x 2 frames, 64x32)", 2, 2, 64, 32, warmup=1, repeat=2)]
    return [Case("model", "training step (CPU: 4 clips x 4 frames, 128x64)", 4, 4, 128, 64, warmup=1, repeat=3),
            Case("model", "long clips (CPU: 2 clips x 16 frames, 128x64)", 2, 16, 128, 64, warmup=1, repeat=3)]


def run_nlam(device, quick: bool = False) -> list[dict]:
    device = str(device)
    rows = live_rows()
    rows.extend(compare(case, device) for case in nlam_cases(device, quick))
    return rows


def run_model(device, quick: bool = False) -> list[dict]:
    device = str(device)
    rows = live_rows()
    rows.extend(compare(case, device) for case in model_cases(device, quick))
    return rows


COLUMNS = ["case", "shape", "L", "amp", "grad_checkpoint", "reference_ms", "fused_ms", "fused_p20_ms", "fused_p80_ms",
           "speedup", "reference_peak_mb", "fused_peak_mb", "memory_ratio"]
EXTRA_COLUMNS = {"nlam": ["reference_attention_tflops", "fused_attention_tflops"],
                 "model": ["reference_clips_per_s", "fused_clips_per_s", "reference_format", "fused_format"]}


def format_table(rows: list[dict]) -> str:
    """The nlam or model suite's table (fused vs reference per case), then each variant's error."""
    suite = rows[0]["suite"] if rows else "nlam"
    text = generic_table(rows, COLUMNS + EXTRA_COLUMNS[suite])
    errors = [f"  {r['case']}: {impl}: {r[impl + '_error']}" for r in rows for impl in IMPLS
              if r.get(impl + "_error")]
    return text + ("\nerrors:\n" + "\n".join(errors) if errors else "")


def prepare_child(threads: int | None, case: Case | None = None, impl: str | None = None,
                  device: str = "cpu") -> None:
    """Import everything a step needs, start the thread pool and, on a CPU, run one step of a
    minimal version of ``case`` (one clip, one frame, small maps), so that the memory a
    subprocess measures from here on is the model's, the inputs' and the step's only, not the
    one-time set-up of the libraries (kernel caches, allocator arenas)."""
    import torch

    import fastnl.losses  # noqa: F401
    import fastnl.model  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    if case is None or impl is None or device.startswith("cuda"):
        return
    small = (16, 8) if case.kind == "nlam" else (64, 32)
    tiny = Case(case.kind, "warm-up", 1, 1, min(case.height, small[0]), min(case.width, small[1]),
                channels=case.channels, amp=case.amp, grad_checkpoint=case.grad_checkpoint, warmup=0, repeat=1)
    BUILDERS[case.kind](tiny, impl, device)()


def _child(payload: dict) -> None:
    case = Case(**payload["case"])
    prepare_child(payload.get("threads"), case, payload["impl"], payload["device"])
    try:
        emit(measure(case, payload["impl"], payload["device"]))
    except Exception as err:  # reported in the parent's row, not as a traceback
        emit({"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})


if __name__ == "__main__":
    import json

    _child(json.loads(sys.argv[1]))
