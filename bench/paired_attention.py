"""Paired timing of attention backends, forward + backward, for a machine whose speed drifts.

Each round runs every backend once, back to back in random order, on the same float32 q, k, v
(one [B, 3D, L] conv output viewed as channel-first [B, L, D]), as ``fastnl bench attention``
does after its CPU rows (``fastnl.benchmarks.attention.paired_rounds``); the speed-up of a round is the
baseline's time over the engine's. The median over rounds is robust to drift that lasts longer
than a round, which single medians per backend (``fastnl bench attention``) are not.

    python bench/paired_attention.py --length 8192 --rounds 12            # torch vs plain, CPU
    python bench/paired_attention.py --baseline plain sdpa-flash sdpa-math  # and SDPA's CPU backends
"""
from __future__ import annotations

import argparse

import torch

from fastnl.benchmarks.attention import CPU_WARMUP, paired_rounds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="L (default 8192)")
    parser.add_argument("--dim", type=int, default=512, help="D (default 512)")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--rounds", type=int, default=12, help="paired rounds (default 12)")
    parser.add_argument("--engine", default="torch", help="backend timed (default torch)")
    parser.add_argument("--baseline", nargs="+", default=["plain"],
                        help="backends it is compared to: plain, sdpa-flash, sdpa-math, ... (default plain)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order of each round")
    parser.add_argument("--warmup", type=int, default=CPU_WARMUP,
                        help=f"untimed runs of each backend first (default {CPU_WARMUP})")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    B, L, D = args.batch, args.length, args.dim
    result = paired_rounds((args.engine, *args.baseline), B, L, D, torch.float32, device, args.rounds,
                           seed=args.seed, warmup=args.warmup)
    for name, median in result.medians().items():
        print(f"{name}: median {median:.4g} s, min {min(result.seconds[name]):.4g} s")
    for baseline in args.baseline:
        s = result.speedup(args.engine, baseline)
        print(f"{args.engine} over {baseline}, B={B} L={L} D={D}, {args.rounds} rounds: median speed-up "
              f"{s['median']:.3f} (range {s['min']:.3f}-{s['max']:.3f})")


if __name__ == "__main__":
    main()
