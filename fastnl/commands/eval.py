"""`fastnl eval`: CMC rank-1/5/10/20 and mAP of a trained checkpoint on a dataset's query/gallery."""
from __future__ import annotations

from pathlib import Path

NAME = "eval"
HELP = ("Evaluate a checkpoint: descriptors of every query and gallery tracklet (consecutive N-frame "
        "sequences averaged), L2 ranking, CMC and mAP (MARS/Duke protocol), as a table and JSON.")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="checkpoint.pt written by `fastnl train`, or its run folder")
    parser.add_argument("--dataset", required=True, choices=("mars", "dukevideo", "synthetic"))
    parser.add_argument("--root", required=True, metavar="DIR", help="dataset folder")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for eval_<dataset>.json and the rank grid (default: the checkpoint's folder)")
    parser.add_argument("--frames", type=int, help="frames per test sequence N (default: the training N)")
    parser.add_argument("--height", type=int, help="frame height (default: the training height)")
    parser.add_argument("--width", type=int, help="frame width (default: the training width)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--impl", choices=("fused", "reference"), help="NLAM implementation (default: the training one)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="autocast dtype; auto = bf16 on CUDA, off on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--loader", choices=("torch", "dali"), default="torch", help="data loading backend")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers")
    parser.add_argument("--verify", action="store_true",
                        help="decode every query and gallery frame before evaluating (finds corrupt JPEGs early)")
    parser.add_argument("--visualize-ranks", type=int, default=0, metavar="K",
                        help="also write a PNG grid of K queries with their top-10 gallery tracklets")


def run(args) -> int:
    import torch

    from fastnl.data.datasets import get_dataset
    from fastnl.errors import UserError
    from fastnl.evaluation import evaluate, model_from_checkpoint, results_table, visualize_ranks, write_json
    from fastnl.train import resolve_amp

    for name in ("frames", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 1 or args.workers < 0 or args.visualize_ranks < 0:
        raise UserError("--batch-size must be >= 1, --workers and --visualize-ranks >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    ckpt = Path(args.checkpoint)
    dataset = get_dataset(args.dataset, args.root, verify=args.verify)
    model, cfg = model_from_checkpoint(ckpt, impl=args.impl, device=device)
    frames = args.frames or int(cfg.get("frames", 8))
    height, width = args.height or int(cfg.get("height", 256)), args.width or int(cfg.get("width", 128))
    print(f"evaluating {ckpt} on {args.dataset} ({len(dataset.query)} query, {len(dataset.gallery)} gallery "
          f"tracklets), sequences of {frames} frames at {height}x{width} on {device}")
    results = evaluate(model, dataset, frames=frames, height=height, width=width, batch_size=args.batch_size,
                       device=device, amp_dtype=resolve_amp(args.amp, device), backend=args.loader,
                       workers=args.workers)
    print(results_table(results))
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent)
    path = write_json(results, out / f"eval_{args.dataset}.json", checkpoint=str(ckpt), dataset=args.dataset,
                      root=str(args.root), frames=frames, height=height, width=width)
    print(f"wrote {path}")
    if args.visualize_ranks:
        png = visualize_ranks(results, dataset, args.visualize_ranks, out / f"ranks_{args.dataset}.png")
        print(f"wrote {png}")
    return 0
