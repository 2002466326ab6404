"""`fastnl eval`: CMC rank-1/5/10/20 and mAP of a trained checkpoint on a dataset's query/gallery."""
from __future__ import annotations

from pathlib import Path

NAME = "eval"
HELP = ("Evaluate a checkpoint: descriptors of every query and gallery tracklet (consecutive N-frame "
        "sequences averaged), L2 ranking, CMC and mAP (MARS/Duke protocol), as a table and JSON. "
        "iLIDS-VID and PRID-2011: one split, or several (--split-id all, --split-ids 0 1 2) with "
        "each split's figures and their mean. --rerank adds the figures after k-reciprocal "
        "re-ranking.")


def add_arguments(parser) -> None:
    from fastnl.runtime import AMP_CHOICES, DEVICES
    from fastnl.vocabulary import LOADERS, MODEL_IMPLS

    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="checkpoint.pt written by `fastnl train`, or its run folder; with "
                        "several splits, '{split}' in the path is replaced by each split id "
                        "(one model per split, as the protocol has it)")
    parser.add_argument("--dataset", required=True,
                        choices=("mars", "dukevideo", "ilidsvid", "prid2011", "synthetic"))
    parser.add_argument("--root", required=True, metavar="DIR", help="dataset folder")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for eval_<dataset>.json and the rank grid (default: the checkpoint's folder)")
    parser.add_argument("--frames", type=int, help="frames per test sequence N (default: the training N)")
    parser.add_argument("--height", type=int, help="frame height (default: the training height)")
    parser.add_argument("--width", type=int, help="frame width (default: the training width)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--impl", choices=MODEL_IMPLS, help="NLAM implementation (default: the training one)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="autocast dtype; auto = bf16 on CUDA, off on CPU")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--loader", choices=LOADERS, default="torch", help="data loading backend")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers")
    parser.add_argument("--verify", action="store_true",
                        help="decode every query and gallery frame before evaluating (finds corrupt JPEGs early)")
    parser.add_argument("--visualize-ranks", type=int, default=0, metavar="K",
                        help="also write a PNG grid of K queries with their top-10 gallery tracklets")
    splits = parser.add_mutually_exclusive_group()
    splits.add_argument("--split-id", metavar="ID|all",
                        help="ilidsvid and prid2011: the train/test split to evaluate (0..9), or "
                        "'all' for every split and their mean (default: 0)")
    splits.add_argument("--split-ids", type=int, nargs="+", metavar="ID",
                        help="ilidsvid and prid2011: evaluate these splits and report their mean")
    parser.add_argument("--splits-file", metavar="PATH",
                        help="prid2011: splits in torchreid's splits_prid2011.json format (default: "
                        "ROOT/splits_prid2011.json when present, else 10 seeded random splits)")
    parser.add_argument("--splits-seed", type=int, metavar="SEED",
                        help="prid2011 without a splits file: the seed of its 10 random half/half "
                        "splits (default: 0)")
    parser.add_argument("--rerank", action="store_true",
                        help="also rank with k-reciprocal re-ranking (Zhong et al. 2017; k1=20, "
                        "k2=6, lambda=0.3) and print both tables")


def _split_ids(args, name: str, num_splits: int | None) -> list[int] | None:
    """The split ids asked for (None for a dataset with one fixed split)."""
    from fastnl.data.datasets import SPLIT_DATASETS
    from fastnl.errors import UserError

    asked = args.split_id is not None or args.split_ids is not None
    if name not in SPLIT_DATASETS:
        if asked or args.splits_file:
            raise UserError(f"{name} has one fixed train/test split: --split-id, --split-ids and "
                            f"--splits-file apply to {' and '.join(SPLIT_DATASETS)} only")
        return None
    if args.splits_file and name != "prid2011":
        raise UserError("--splits-file applies to prid2011 only (iLIDS-VID's splits are the "
                        "release's .mat table)")
    if args.split_ids is not None:
        ids = args.split_ids
    elif args.split_id is None:
        ids = [0]
    elif args.split_id == "all":
        ids = list(range(num_splits))
    else:
        try:
            ids = [int(args.split_id)]
        except ValueError:
            raise UserError(f"--split-id must be a split number or 'all', got {args.split_id!r}") from None
    bad = [i for i in ids if not 0 <= i < num_splits]
    if bad:
        raise UserError(f"split id {bad[0]} out of range: {name} has {num_splits} splits "
                        f"(0..{num_splits - 1})")
    if len(set(ids)) != len(ids):
        raise UserError(f"--split-ids lists a split more than once: {ids}")
    return ids


def run(args) -> int:
    from fastnl.data.datasets import SPLIT_DATASETS, get_dataset, resolve_name
    from fastnl.errors import UserError
    from fastnl.evaluation import (average_splits, evaluate, model_from_checkpoint, results_table,
                                   splits_table, visualize_ranks, write_json)
    from fastnl.runtime import resolve_amp, resolve_device

    for name in ("frames", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 1 or args.workers < 0 or args.visualize_ranks < 0:
        raise UserError("--batch-size must be >= 1, --workers and --visualize-ranks >= 0")
    device = resolve_device(args.device)
    reader = resolve_name(args.dataset, args.root)
    extra = {"splits": args.splits_file} if args.splits_file and reader == "prid2011" else {}
    if args.splits_seed is not None:
        if reader != "prid2011":
            raise UserError("--splits-seed applies to prid2011 only (its splits are made from a "
                            "seed when no splits file is given)")
        extra["seed"] = args.splits_seed

    def load(split_id):
        return get_dataset(args.dataset, args.root, split_id=split_id, verify=args.verify, **extra)

    first = load(0) if reader in SPLIT_DATASETS else None
    split_ids = _split_ids(args, reader, first.num_splits if first is not None else 0)
    template = "{split}" in args.checkpoint
    if template and not split_ids:
        raise UserError("--checkpoint names '{split}' but the dataset has no splits to fill it with")
    if split_ids and len(split_ids) > 1 and not template:
        print("note: one checkpoint for every split: its training ids may be test ids of the other "
              "splits; name one checkpoint per split with '{split}' in --checkpoint")

    per_split, model, cfg, ckpt = [], None, None, None
    for split_id in split_ids or [None]:
        path = Path(args.checkpoint.replace("{split}", str(split_id)) if template else args.checkpoint)
        if model is None or template:
            model, cfg = model_from_checkpoint(path, impl=args.impl, device=device)
            ckpt = path
        dataset = first if (first is not None and split_id == 0) else load(split_id)
        frames = args.frames or cfg["frames"]
        height, width = args.height or cfg["height"], args.width or cfg["width"]
        where = f" split {split_id}" if split_id is not None else ""
        print(f"evaluating {ckpt} on {args.dataset}{where} ({len(dataset.query)} query, "
              f"{len(dataset.gallery)} gallery tracklets), sequences of {frames} frames at "
              f"{height}x{width} on {device}")
        results = evaluate(model, dataset, frames=frames, height=height, width=width,
                           batch_size=args.batch_size, device=device,
                           amp_dtype=resolve_amp(args.amp, device), backend=args.loader,
                           workers=args.workers, rerank=args.rerank)
        print(results_table(results))
        if args.rerank:
            print("with k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3):")
            print(results_table(results["reranked"]))
        out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent)
        stem = args.dataset + (f"_split{split_id}" if split_ids and len(split_ids) > 1 else "")
        info = dict(checkpoint=str(ckpt), dataset=args.dataset, root=str(args.root), frames=frames,
                    height=height, width=width)
        if split_id is not None:
            info["split_id"] = split_id
        path = write_json(results, out / f"eval_{stem}.json", **info)
        print(f"wrote {path}")
        if args.visualize_ranks:
            png = visualize_ranks(results, dataset, args.visualize_ranks, out / f"ranks_{stem}.png")
            print(f"wrote {png}")
        per_split.append(results)

    if split_ids and len(split_ids) > 1:
        print(f"{args.dataset}: {len(split_ids)} splits")
        print(splits_table(per_split, split_ids))
        if args.rerank:
            print("with k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3):")
            print(splits_table(per_split, split_ids, key="reranked"))
        out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent)
        keep = ("mAP", "rank1", "rank5", "rank10", "rank20", "reranked", "num_query", "num_gallery")
        path = write_json({**average_splits(per_split),
                           "splits": [{"split_id": s, **{k: r[k] for k in keep if k in r}}
                                      for s, r in zip(split_ids, per_split)]},
                          out / f"eval_{args.dataset}_splits.json", checkpoint=args.checkpoint,
                          dataset=args.dataset, root=str(args.root), split_ids=split_ids)
        print(f"wrote {path}")
    return 0
