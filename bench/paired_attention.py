"""Paired timing of two attention backends, forward + backward, for a machine whose speed drifts.

Each round runs both backends once, back to back in random order, on the same q, k, v (one
[B, 3D, L] conv output viewed as channel-first [B, L, D]); the speed-up of a round is the
baseline's time over the engine's. The median over rounds is robust to drift that lasts longer
than a round, which single medians per backend (``fastnl bench attention``) are not.

    python bench/paired_attention.py --length 8192 --rounds 12            # torch vs plain, CPU
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from fastnl import ops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="L (default 8192)")
    parser.add_argument("--dim", type=int, default=512, help="D (default 512)")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--rounds", type=int, default=12, help="paired rounds (default 12)")
    parser.add_argument("--engine", default="torch", help="backend timed (default torch)")
    parser.add_argument("--baseline", default="plain", help="backend it is compared to (default plain)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the order")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    B, L, D = args.batch, args.length, args.dim
    x = torch.randn(B, 3 * D, L, generator=gen).to(device)
    q, k, v = [t.transpose(1, 2).detach().requires_grad_() for t in x.chunk(3, dim=1)]
    grad = torch.randn(B, L, D, generator=gen).to(device)

    def step(backend):
        def run():
            out = ops.nl_attention(q, k, v, scale=D ** -0.5, backend=backend)
            torch.autograd.grad(out, (q, k, v), grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    fns = {args.engine: step(args.engine), args.baseline: step(args.baseline)}
    for fn in fns.values():
        fn()  # warm-up
    order_rng = random.Random(args.seed)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name in order_rng.sample(list(fns), len(fns)):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.4g} s, min {min(ts):.4g} s")
    ratios = sorted(b / e for b, e in zip(times[args.baseline], times[args.engine]))
    print(f"{args.engine} over {args.baseline}, B={B} L={L} D={D}, {args.rounds} rounds: median speed-up "
          f"{statistics.median(ratios):.3f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
