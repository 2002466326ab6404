"""The extension's ops against plain PyTorch: the channel attention (paper eq. 3) and the SE
bottleneck tail; on CUDA also the Triton BatchNorm + ReLU op.

``run(device, quick=False)`` times the forward and the forward+backward of
``fastnl.ops.channel_attention`` (gradients of x, W1, b1, W2, b2) with backend "extension" and
"reference" on the NLAM shapes of a 256x128 input with B*N = 256 frames: C = 1024 at 16x8
(after layer3) and C = 2048 at 8x4 (after layer4), R = C/16; and of
``fastnl.ops.se_residual_relu`` (gradients of x, gate, shortcut) at the four stages' bottleneck
outputs of those 256 frames (layer1 256 x 64x32 to layer4 2048 x 8x4); float32 and bfloat16
on CUDA, float32 on CPU. The SE tail's traffic floor: forward read x and shortcut, write out;
backward read grad_out, out and x, write grad_x and grad_shortcut. On CUDA,
``fastnl.ops.batch_norm_relu`` in training mode (gradients of x, weight, bias) with backend
"triton" and "reference" (cuDNN's BatchNorm, then ReLU) at the bottlenecks' first BatchNorm of
layer1 (64 x 64x32) and layer3 (256 x 16x8); its floor: forward read x, write y; backward read
grad_y and x, write grad_x (the kernels read x once more in each direction). And
``fastnl.ops.bn_se_residual_relu`` (a bottleneck's end from its last BatchNorm on; gradients of
y, the shortcut, the BatchNorm's and the SE module's parameters) with backend "triton" and
"reference" (BatchNorm, SE module, sum and ReLU as timm runs them) at the bottleneck outputs of
layer1 and layer4; its floor is the SE tail's (the kernels read y once more in each direction);
and the same with the shortcut's BatchNorm in the op (``shortcut_norm``, a downsampling block's
end: layer1's first; plain runs cuDNN's BatchNorm on the shortcut first), floor 3 passes
forward and 9 in all.

Each record gives the median time and its 20th/80th percentiles, the achieved bandwidth over the memory-traffic floor (forward:
read x, write out; backward: read grad_out and x, write grad_x) and the floor ratio: the time
over floor_bytes / copy bandwidth, where the device-to-device copy bandwidth of a tensor the
size of x is measured in the same run.
"""
from __future__ import annotations

import math

import torch

from fastnl import ops, reference
from fastnl.benchmarks import live_rows, timer

REAL_SHAPES = [(32, 8, 1024, 16, 8), (32, 8, 2048, 8, 4)]  # (B, N, C, H, W), B*N = 256 frames
QUICK_SHAPES = [(4, 4, 256, 16, 8), (4, 4, 512, 8, 4)]
# SE tails: (frames, C, H, W) after layer1..layer4 at 256x128
SE_REAL_SHAPES = [(256, 256, 64, 32), (256, 512, 32, 16), (256, 1024, 16, 8), (256, 2048, 8, 4)]
SE_QUICK_SHAPES = [(16, 256, 16, 8), (16, 2048, 2, 1)]
# BatchNorm + ReLU: (frames, C, H, W) of bn1 in layer1 and layer3 at 256x128
BN_REAL_SHAPES = [(256, 64, 64, 32), (256, 256, 16, 8)]
BN_QUICK_SHAPES = [(16, 64, 16, 8)]
# the bottleneck end: (frames, C, H, W) after layer1 and layer4 at 256x128
BN_SE_REAL_SHAPES = [(256, 256, 64, 32), (256, 2048, 8, 4)]
BN_SE_QUICK_SHAPES = [(16, 256, 16, 8)]
# a downsampling bottleneck's end, its shortcut's BatchNorm in the op: layer1's first block
BN_SE_NORM_REAL_SHAPES = [(256, 256, 64, 32)]
REDUCTION = 16


def _inputs(shape, dtype, device, requires_grad):
    B, N, C, H, W = shape
    R = max(1, C // REDUCTION)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    w1 = (torch.randn(R, C, generator=gen) / C**0.5).to(device=device, dtype=dtype)
    b1 = torch.zeros(R, device=device, dtype=dtype)
    w2 = (torch.randn(C, R, generator=gen) / R**0.5).to(device=device, dtype=dtype)
    b2 = torch.zeros(C, device=device, dtype=dtype)
    tensors = [x, w1, b1, w2, b2]
    return [t.requires_grad_(requires_grad) for t in tensors]


def copy_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, measure) -> float:
    """Bytes per second of dst.copy_(src) for numel elements (read + write), at the median time."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    return 2 * numel * src.element_size() / measure(lambda: dst.copy_(src)).median_s


def _se_inputs(shape, dtype, device, requires_grad):
    N, C = shape[:2]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    shortcut = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    gate = torch.rand(N, C, 1, 1, generator=gen).to(device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, gate, shortcut)]


def _bn_inputs(shape, dtype, device, requires_grad):
    C = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    weight, bias = (torch.randn(C, generator=gen).to(device).requires_grad_(requires_grad) for _ in range(2))
    return [x, weight, bias]


def _bn_call(args, backend, running):
    x, weight, bias = args
    return ops.batch_norm_relu(x, running[0], running[1], weight, bias, training=True, backend=backend)


def _bn_se_inputs(shape, dtype, device, requires_grad):
    """y, shortcut (dtype), the BatchNorm's weight and bias and the SE module's fc1 / fc2
    weights and biases (float32, R = C / 16)."""
    C = shape[1]
    R = max(1, C // REDUCTION)
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]
    params = [torch.rand(C, generator=gen) + 0.5, 0.1 * torch.randn(C, generator=gen),
              torch.randn(R, C, 1, 1, generator=gen) / C ** 0.5, 0.1 * torch.randn(R, generator=gen),
              torch.randn(C, R, 1, 1, generator=gen) / R ** 0.5, 0.1 * torch.randn(C, generator=gen)]
    return [t.requires_grad_(requires_grad) for t in [*maps, *(p.to(device) for p in params)]]


def _bn_se_call(args, backend, running):
    y, shortcut, weight, bias, *se_params = args
    excite = reference.se_excitation(*se_params)  # the SE convolutions in the maps' dtype, as under autocast
    return ops.bn_se_residual_relu(y, running[0], running[1], weight, bias, excite, shortcut, training=True,
                                   backend=backend)


def _bn_se_norm_inputs(shape, dtype, device, requires_grad):
    """:func:`_bn_se_inputs`, the shortcut the output of the downsampling convolution, and its
    BatchNorm's weight and bias (float32)."""
    gen = torch.Generator().manual_seed(1)
    shortcut_bn = [(torch.rand(shape[1], generator=gen) + 0.5).to(device),
                   (0.1 * torch.randn(shape[1], generator=gen)).to(device)]
    return _bn_se_inputs(shape, dtype, device, requires_grad) + [t.requires_grad_(requires_grad) for t in shortcut_bn]


def _bn_se_norm_call(args, backend, running):
    """The end with its shortcut's BatchNorm (``shortcut_norm``: in the op with "triton", before
    the plain end with "reference"), both BatchNorms updating running statistics."""
    *end, shortcut_weight, shortcut_bias = args
    y, shortcut, weight, bias, *se_params = end
    norm = ops.ShortcutNorm(running[2], running[3], shortcut_weight, shortcut_bias)
    return ops.bn_se_residual_relu(y, running[0], running[1], weight, bias, reference.se_excitation(*se_params),
                                   shortcut, training=True, backend=backend, shortcut_norm=norm)


def _time_op(records, op, shape, dtype, device, measure, floor_passes, make, call,
             backends=("extension", "reference")) -> None:
    """Forward and forward+backward of ``call`` on ``make``'s tensors for each of ``backends``
    (the last one plain PyTorch), appended as records; the floors are x-sized passes (forward,
    both)."""
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    copy_bps = copy_bandwidth(numel, dtype, device, measure)
    floors = {"fwd": floor_passes[0] * numel * itemsize, "fwd+bwd": floor_passes[1] * numel * itemsize}
    times = {}
    for backend in backends:
        with torch.no_grad():
            args = make(False)
            times[("fwd", backend)] = measure(lambda: call(args, backend))
        leaves = make(True)
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

        def step(leaves=leaves, grad_out=grad_out, backend=backend):
            out = call(leaves, backend)
            torch.autograd.grad(out, leaves, grad_out)

        times[("fwd+bwd", backend)] = measure(step)
        del leaves, grad_out, args
    for (pass_, backend), timing in times.items():
        floor_bytes, seconds = floors[pass_], timing.median_s
        records.append(
            {
                "op": op,
                "pass": pass_,
                "backend": backend,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(),
                "dtype": str(dtype).replace("torch.", ""),
                "shape": list(shape),
                **timing.fields(),
                "timer": timing.timer,
                "floor_bytes": floor_bytes,
                "gb_per_s": floor_bytes / seconds / 1e9,
                "copy_gb_per_s": copy_bps / 1e9,
                "floor_ms": floor_bytes / copy_bps * 1e3,
                "floor_ratio": seconds * copy_bps / floor_bytes,
                "speedup_vs_reference": times[(pass_, backends[-1])].median_s / seconds,
            }
        )


def run(device, quick: bool = False, batch_norm: bool | None = None) -> list[dict]:
    """Benchmark records (one per shape, dtype, pass and backend) on ``device``; the BatchNorm
    rows (BatchNorm + ReLU, the bottleneck end) where ``batch_norm`` (default: on CUDA, where Triton runs compiled; interpreted on
    a CPU it is far too slow to time)."""
    device = torch.device(device)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    shapes = QUICK_SHAPES if quick else REAL_SHAPES
    reps, warmup = (3, 1) if quick or device.type == "cpu" else (20, 5)

    def measure(fn) -> timer.Timing:
        return timer.measure(fn, device, warmup=warmup, runs=reps, min_time_s=0.02 if quick else 0.1)

    records = live_rows()
    for shape in shapes:
        for dtype in dtypes:
            _time_op(records, "channel_attention", shape, dtype, device, measure, floor_passes=(2, 5),
                     make=lambda requires_grad, shape=shape, dtype=dtype: _inputs(shape, dtype, device, requires_grad),
                     call=lambda args, backend: ops.channel_attention(*args, backend=backend))
    for shape in SE_QUICK_SHAPES if quick else SE_REAL_SHAPES:
        for dtype in dtypes:
            _time_op(records, "se_residual_relu", shape, dtype, device, measure, floor_passes=(3, 8),
                     make=lambda requires_grad, shape=shape, dtype=dtype: _se_inputs(shape, dtype, device, requires_grad),
                     call=lambda args, backend: ops.se_residual_relu(*args, backend=backend))
    if device.type == "cuda" if batch_norm is None else batch_norm:
        for op, shapes, floors, make, call in (
                ("batch_norm_relu", BN_QUICK_SHAPES if quick else BN_REAL_SHAPES, (2, 5), _bn_inputs, _bn_call),
                ("bn_se_residual_relu", BN_SE_QUICK_SHAPES if quick else BN_SE_REAL_SHAPES, (3, 8), _bn_se_inputs,
                 _bn_se_call),
                # its floor: forward read y and the shortcut, write out; backward read the
                # output's gradient, out, y and the shortcut, write both gradients
                ("bn_se_residual_relu[shortcut_norm]", BN_SE_QUICK_SHAPES if quick else BN_SE_NORM_REAL_SHAPES,
                 (3, 9), _bn_se_norm_inputs, _bn_se_norm_call)):
            for shape in shapes:
                # running (mean, var) of the BatchNorm, and of the shortcut's where there is one
                running = tuple(f(shape[1], device=device) for f in (torch.zeros, torch.ones) * 2)
                for dtype in dtypes:
                    _time_op(records, op, shape, dtype, device, measure, floor_passes=floors,
                             make=lambda requires_grad, shape=shape, dtype=dtype, make=make: make(
                                 shape, dtype, device, requires_grad),
                             call=lambda args, backend, running=running, call=call: call(args, backend, running),
                             backends=("triton", "reference"))
    return records


def format_table(records: list[dict]) -> str:
    """One line per record: shape, dtype, pass, backend, median ms (20th-80th percentile), GB/s,
    floor ratio, speedup."""
    lines = [f"{'op':>17} {'shape':>22} {'dtype':>8} {'pass':>7} {'backend':>9} {'ms':>9} {'p20-p80 ms':>17} "
             f"{'GB/s':>7} {'floor x':>7} {'speedup':>7}"]
    for r in records:
        spread = f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}" if "p20_ms" in r else "-"
        lines.append(
            f"{r.get('op', 'channel_attention'):>17} {'x'.join(map(str, r['shape'])):>22} {r['dtype']:>8} "
            f"{r['pass']:>7} {r['backend']:>9} "
            f"{r['ms']:9.2f} {spread:>17} {r['gb_per_s']:7.1f} {r['floor_ratio']:7.2f} {r['speedup_vs_reference']:7.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from fastnl.runtime import default_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--quick", action="store_true")
    cli = parser.parse_args()
    print(format_table(run(cli.device, quick=cli.quick)))
