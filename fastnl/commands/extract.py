"""`fastnl extract`: descriptors of your own tracklets with a trained checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path

NAME = "extract"
HELP = ("Describe your own tracklets with a checkpoint: every folder of frames under --input "
        "(<root>/<any path>/<tracklet>/*.jpg|png) or the tracklet,frame rows of a CSV; each "
        "tracklet cut into consecutive N-frame sequences whose descriptors are averaged (the "
        "test protocol of `fastnl eval`). Writes descriptors.npy (float32 [tracklets, 2048]), "
        "index.csv (row, tracklet, frames used/skipped) and extract.json to --out.")


def add_arguments(parser) -> None:
    from fastnl.runtime import AMP_CHOICES, DEVICES
    from fastnl.vocabulary import LOADERS, MODEL_IMPLS

    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="checkpoint.pt written by `fastnl train`, or its run folder")
    parser.add_argument("--input", required=True, metavar="DIR|CSV",
                        help="a folder of tracklet folders, or a CSV file with the columns "
                        "tracklet,frame (one row per frame; relative paths from the CSV's folder)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the outputs")
    parser.add_argument("--normalize", action="store_true",
                        help="L2-normalise each descriptor (cosine ranking)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out frames that do not decode (each is reported by path); "
                        "without it the first bad frame stops the run")
    parser.add_argument("--frames", type=int, help="frames per sequence N (default: the training N)")
    parser.add_argument("--height", type=int, help="frame height (default: the training height)")
    parser.add_argument("--width", type=int, help="frame width (default: the training width)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--impl", choices=MODEL_IMPLS, help="NLAM implementation (default: the training one)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="autocast dtype; auto = bf16 on CUDA, off on CPU")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto = the GPU when there is one")
    parser.add_argument("--loader", choices=LOADERS, default="torch", help="data loading backend")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from fastnl.descriptors import check_frames, extract, load_tracklets, write_outputs
    from fastnl.errors import UserError
    from fastnl.evaluation import model_from_checkpoint
    from fastnl.runtime import resolve_amp, resolve_device

    for name in ("frames", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    device = resolve_device(args.device)
    start = time.perf_counter()
    tracklets = load_tracklets(args.input)
    total = sum(len(f) for _, f in tracklets)
    print(f"{len(tracklets)} tracklets, {total} frames in {args.input}; checking every frame")
    tracklets, skipped, bad, empty = check_frames(tracklets, skip_bad=args.skip_bad)
    for path, reason in bad:
        print(f"skipped bad frame: {reason}", file=sys.stderr)
    for name in empty:
        print(f"skipped tracklet {name}: no readable frame", file=sys.stderr)
    ckpt = Path(args.checkpoint)
    model, cfg = model_from_checkpoint(ckpt, impl=args.impl, device=device)
    frames = args.frames or cfg["frames"]
    height, width = args.height or cfg["height"], args.width or cfg["width"]
    print(f"describing {len(tracklets)} tracklets with {ckpt}: sequences of {frames} frames at "
          f"{height}x{width} on {device}")
    desc = extract(model, tracklets, frames=frames, height=height, width=width,
                   normalize=args.normalize, batch_size=args.batch_size, device=device,
                   amp_dtype=resolve_amp(args.amp, device), backend=args.loader,
                   workers=args.workers, progress=not args.no_progress)
    settings = dict(checkpoint=str(ckpt), input=str(args.input), frames=frames, height=height,
                    width=width, normalized=bool(args.normalize), tracklets=len(tracklets),
                    bad_frames=[p for p, _ in bad], empty_tracklets=empty)
    npy, index = write_outputs(Path(args.out), [n for n, _ in tracklets], [f for _, f in tracklets],
                               skipped, desc, settings)
    print(f"wrote {npy} ({desc.shape[0]} x {desc.shape[1]} float32"
          f"{', L2-normalised' if args.normalize else ''}) and {index}"
          f"{f'; skipped {len(bad)} bad frame(s)' if bad else ''} in {time.perf_counter() - start:.1f} s")
    return 0
