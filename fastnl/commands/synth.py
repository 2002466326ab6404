"""`fastnl synth`: write a small synthetic video re-ID dataset in an official layout."""
from __future__ import annotations

import time
import warnings

NAME = "synth"
HELP = ("write a synthetic video re-ID dataset (real JPEG/PNG frames and .mat files) in the MARS, "
        "DukeMTMC-VideoReID, iLIDS-VID or PRID-2011 layout")


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=("mars", "dukevideo", "ilidsvid", "prid2011"),
                        default="mars", help="on-disk layout to write")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--ids", type=int, default=40,
                        help="identities (half train, half test; for ilidsvid and prid2011 the "
                        "persons seen by both cameras, split 10 times)")
    parser.add_argument("--cams", type=int,
                        help="cameras (default: 4; ilidsvid and prid2011 have 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--height", type=int, default=128, help="frame height")
    parser.add_argument("--width", type=int, default=64, help="frame width")
    parser.add_argument("--min-frames", type=int,
                        help="shortest tracklet (default: 4; 20 for prid2011)")
    parser.add_argument("--max-frames", type=int,
                        help="longest tracklet (default: 16; 40 for prid2011)")


def run(args) -> int:
    from fastnl.data.datasets import get_dataset
    from fastnl.data.synthetic import write_dataset

    start = time.perf_counter()
    root = write_dataset(args.out, fmt=args.format, ids=args.ids, cams=args.cams, seed=args.seed,
                         size=(args.height, args.width), min_frames=args.min_frames,
                         max_frames=args.max_frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = get_dataset("synthetic", root)
    print(dataset.summary())
    print(f"wrote {root} in {time.perf_counter() - start:.1f} s")
    return 0
