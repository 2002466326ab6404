"""`fastnl demo`: the paper's model on synthetic clips, fused vs reference, forward and backward."""
from __future__ import annotations

import time

NAME = "demo"
HELP = ("Run the paper's model (SE-ResNet50 + NLAM(4,5) + NLTP) on random clips at a reduced "
        "CPU-friendly setting: a few training steps with the fused and the reference NLAM, "
        "checking that both give the same outputs.")


def add_arguments(parser) -> None:
    parser.add_argument("--clips", type=int, default=4, help="clips per batch")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip (N)")
    parser.add_argument("--height", type=int, default=128, help="frame height")
    parser.add_argument("--width", type=int, default=64, help="frame width")
    parser.add_argument("--steps", type=int, default=3, help="training steps")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import torch

    from fastnl.losses import ReIDLoss
    from fastnl.model import build_model

    torch.manual_seed(args.seed)
    print(f"fastnl demo: {args.clips} clips x {args.frames} frames at {args.height}x{args.width} "
          f"(reduced from the paper's 32 x 8 at 256x128 to fit a CPU), NLAM after blocks 4,5, NLTP")
    num_ids = max(2, args.clips // 2)
    pids = torch.arange(args.clips) % num_ids
    clips = torch.randn(args.clips, args.frames, 3, args.height, args.width)
    models = {impl: build_model(num_ids, frames=args.frames, impl=impl) for impl in ("fused", "reference")}
    models["reference"].load_state_dict(models["fused"].state_dict())
    criterion = ReIDLoss()
    optimizers = {impl: torch.optim.Adam(m.parameters(), lr=1e-4) for impl, m in models.items()}
    for step in range(1, args.steps + 1):
        losses = {}
        for impl, model in models.items():
            model.train()
            t0 = time.perf_counter()
            logits, desc = model(clips)
            loss, parts = criterion(logits, desc, pids)
            optimizers[impl].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[impl].step()
            losses[impl] = loss.item()
            print(f"step {step} {impl:9s} loss {loss.item():.4f} (ce {parts['ce']:.4f}, "
                  f"triplet {parts['triplet']:.4f}) {time.perf_counter() - t0:.2f}s")
        diff = abs(losses["fused"] - losses["reference"])
        print(f"step {step} |loss fused - loss reference| = {diff:.2e}")
    for model in models.values():
        model.eval()
    with torch.no_grad():
        d_f, d_r = models["fused"](clips), models["reference"](clips)
    print(f"descriptors {tuple(d_f.shape)}, max |fused - reference| = {(d_f - d_r).abs().max().item():.2e}")
    return 0
