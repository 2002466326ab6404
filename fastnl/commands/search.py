"""`fastnl search`: the tracklets nearest a query among descriptors written by `fastnl extract`."""
from __future__ import annotations

import re
from pathlib import Path

NAME = "search"
HELP = ("Rank the tracklets of descriptors.npy (from `fastnl extract`) by L2 distance to one of "
        "them, print the --top nearest and draw them as a PNG strip (middle frame of each).")


def add_arguments(parser) -> None:
    parser.add_argument("--descriptors", required=True, metavar="PATH",
                        help="descriptors.npy written by `fastnl extract`, or its folder "
                        "(index.csv is read beside it)")
    parser.add_argument("--query", required=True, metavar="TRACKLET",
                        help="the query tracklet as named in index.csv (or the end of its path)")
    parser.add_argument("--top", type=int, default=10, help="how many nearest tracklets")
    parser.add_argument("--png", metavar="PATH",
                        help="where to draw them (default: search_<query>.png beside the descriptors)")


def run(args) -> int:
    from fastnl.descriptors import draw_search, find_query, load_index, nearest
    from fastnl.errors import UserError

    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    desc, rows, folder = load_index(args.descriptors)
    if len(rows) < 2:
        raise UserError("the descriptors hold a single tracklet: nothing to search")
    qi = find_query(rows, args.query)
    hits = nearest(desc, qi, args.top)
    print(f"query {rows[qi]['tracklet']} ({rows[qi]['frames_used']} frames); "
          f"{len(hits)} nearest of {len(rows) - 1}:")
    print(f"{'rank':>4}  {'distance':>9}  tracklet")
    for rank, (j, dist) in enumerate(hits, start=1):
        print(f"{rank:>4}  {dist:>9.4f}  {rows[j]['tracklet']}")
    png = Path(args.png) if args.png else folder / (
        "search_" + re.sub(r"[^A-Za-z0-9._-]+", "_", rows[qi]["tracklet"]) + ".png")
    print(f"wrote {draw_search(rows, qi, hits, png)}")
    return 0
