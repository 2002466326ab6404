"""`fastnl demo`: the whole pipeline on a CPU in a few minutes.

Writes the synthetic dataset, trains the paper's network (SE-ResNet50 + NLAM(4,5) + NLTP, CE +
batch-hard triplet) at a reduced setting, evaluates it under the MARS protocol and prints
CMC/mAP beside the chance level. Everything goes to ``--out`` or to a temporary folder that
is removed at the end.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

NAME = "demo"
HELP = ("Generate the synthetic dataset, train the paper's network on CPU at a reduced setting "
        "(a few minutes), evaluate it and print CMC/mAP against chance.")


def add_arguments(parser) -> None:
    from fastnl.vocabulary import MODEL_IMPLS

    parser.add_argument("--out", metavar="DIR",
                        help="keep the dataset and the run here (default: a temporary folder, removed)")
    parser.add_argument("--ids", type=int, default=40, help="synthetic identities (half train, half test)")
    parser.add_argument("--cams", type=int, default=4, help="synthetic cameras")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip N (paper: 8)")
    parser.add_argument("--height", type=int, default=64, help="frame height (paper: 256)")
    parser.add_argument("--width", type=int, default=32, help="frame width (paper: 128)")
    parser.add_argument("--p", type=int, default=8, help="identities per batch P (paper: 8)")
    parser.add_argument("--k", type=int, default=4, help="tracklets per identity K (paper: 4)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="training epochs (paper: 800); 20 x 3 steps take about 4 minutes on 2 cores")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (paper: 1e-4)")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="stop training after this many minutes even if epochs remain (default 0: no limit; "
                             "a limit makes the result depend on the machine's speed)")
    parser.add_argument("--impl", choices=MODEL_IMPLS, default="fused", help="NLAM implementation")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the dataset, the initialisation and the data order: without --minutes, "
                             "one seed gives one result on one machine and thread count")


def run(args) -> int:
    import torch

    from fastnl.data.datasets import get_dataset
    from fastnl.data.synthetic import write_dataset
    from fastnl.errors import UserError
    from fastnl.evaluation import evaluate, model_from_checkpoint, results_table, write_json
    from fastnl.train import TrainConfig, train

    if args.ids < 4 or args.epochs < 1 or args.frames < 1 or args.minutes < 0:
        raise UserError("--ids must be >= 4, --epochs and --frames >= 1, --minutes >= 0")
    start = time.perf_counter()
    print(f"fastnl demo: SE-ResNet50 + NLAM after blocks 4,5 + NLTP, trained from scratch on CPU "
          f"({torch.get_num_threads()} threads) at a reduced setting:\n"
          f"  {args.ids} synthetic ids ({args.ids // 2} train, {args.ids - args.ids // 2} test), {args.cams} cameras; "
          f"clips of {args.frames} frames at {args.height}x{args.width}; P x K = {args.p} x {args.k}; "
          f"Adam lr {args.lr:g}, {args.epochs} epochs"
          f"{f' or {args.minutes:g} minutes, whichever comes first' if args.minutes else ''}\n"
          f"  (paper / `fastnl train` defaults: MARS, 8 frames at 256x128, P x K = 8 x 4, lr 1e-4, 800 epochs)")
    with tempfile.TemporaryDirectory(prefix="fastnl-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        root = write_dataset(out / "data", fmt="mars", ids=args.ids, cams=args.cams, seed=args.seed,
                             size=(args.height, args.width), min_frames=args.frames,
                             max_frames=4 * args.frames)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = get_dataset("synthetic", root)
        print(f"[{time.perf_counter() - start:5.0f} s] wrote the synthetic dataset: {len(dataset.train)} train, "
              f"{len(dataset.query)} query, {len(dataset.gallery)} gallery tracklets")
        cfg = TrainConfig(dataset="synthetic", root=str(root), out=str(out / "run"), frames=args.frames,
                          height=args.height, width=args.width, p=args.p, k=args.k, epochs=args.epochs,
                          lr=args.lr, lr_step=max(1, (3 * args.epochs) // 4), impl=args.impl, amp="off",
                          device="cpu", workers=args.workers, save_every=args.epochs, seed=args.seed,
                          max_minutes=args.minutes, tensorboard=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(cfg)
            print(f"[{time.perf_counter() - start:5.0f} s] trained {result['step']} steps, final loss "
                  f"{result['loss']:.3f}; evaluating")
            model, _ = model_from_checkpoint(result["checkpoint"], device="cpu")
            results = evaluate(model, dataset, frames=args.frames, height=args.height, width=args.width,
                               batch_size=32, workers=args.workers)
        print(results_table(results))
        if args.out:
            print(f"wrote {write_json(results, out / 'run' / 'eval_synthetic.json')}")
    ratio = results["mAP"] / max(results["chance"]["mAP"], 1e-9)
    print(f"[{time.perf_counter() - start:5.0f} s] mAP {100 * results['mAP']:.1f}% and rank-1 "
          f"{100 * results['rank1']:.1f}% vs chance {100 * results['chance']['mAP']:.1f}% / "
          f"{100 * results['chance']['rank1']:.1f}% ({ratio:.1f}x the chance mAP) on "
          f"{results['num_query']} queries of unseen ids")
    return 0
