"""Descriptors of a user's own tracklets (``fastnl extract``) and nearest-tracklet search
(``fastnl search``).

A tracklet is either a folder of frames (``<root>/<any path>/<tracklet>/*.jpg|jpeg|png``: every
folder that directly holds frames is one tracklet, named by its path under the root) or a
group of rows of a CSV file with the columns ``tracklet,frame`` (one row per frame, in order;
relative frame paths are read from the CSV's folder). Descriptors follow the paper's test
protocol, as :func:`fastnl.evaluation.extract_descriptors` computes them for evaluation:
consecutive N-frame sequences, their descriptors averaged.

Outputs: ``descriptors.npy`` (float32 [T, D], L2-normalised on request), ``index.csv`` (row,
tracklet, frames used, frames skipped, a middle frame for drawing) and ``extract.json`` (the
settings).
"""
from __future__ import annotations

import csv
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fastnl.errors import UserError

FRAME_EXTS = (".jpg", ".jpeg", ".png")
INDEX_COLUMNS = ("row", "tracklet", "frames_used", "frames_skipped", "middle_frame")


def _natural(name: str):
    """Sort key that orders frame 2 before frame 10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def find_tracklets(root) -> list[tuple[str, list[str]]]:
    """[(tracklet name, frame paths)] of every folder under ``root`` that directly holds
    frames, sorted by name; frames in natural name order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"tracklet folder not found: {root} (expected a folder of tracklet "
                        "folders, or a CSV file with tracklet,frame columns)")
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        frames = sorted((f for f in files if f.lower().endswith(FRAME_EXTS)), key=_natural)
        if frames:
            rel = os.path.relpath(folder, root)
            out.append((root.name if rel == "." else rel.replace(os.sep, "/"),
                        [os.path.join(folder, f) for f in frames]))
    if not out:
        raise UserError(f"no tracklets under {root}: no folder there holds .jpg/.jpeg/.png frames")
    return sorted(out, key=lambda t: _natural(t[0]))


def read_tracklet_csv(path) -> list[tuple[str, list[str]]]:
    """[(tracklet name, frame paths)] from a CSV with ``tracklet`` and ``frame`` columns, in
    order of first appearance; frames in row order."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"tracklet", "frame"} <= set(reader.fieldnames):
                raise UserError(f"{path}: expected a header with the columns tracklet,frame "
                                f"(found {','.join(reader.fieldnames or []) or 'no header'})")
            groups: dict[str, list[str]] = {}
            for line, row in enumerate(reader, start=2):
                name, frame = (row.get("tracklet") or "").strip(), (row.get("frame") or "").strip()
                if not name or not frame:
                    raise UserError(f"{path}: line {line} has an empty tracklet or frame field")
                groups.setdefault(name, []).append(
                    frame if os.path.isabs(frame) else str(path.parent / frame))
    except OSError as err:
        raise UserError(f"cannot read tracklet list {path}: {err.strerror or err}") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable CSV file: {err}") from None
    if not groups:
        raise UserError(f"{path}: no frames listed")
    return list(groups.items())


def load_tracklets(source) -> list[tuple[str, list[str]]]:
    """Tracklets from a folder or a ``.csv`` file (see the module docstring)."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise UserError(f"{source} is a file but not a .csv tracklet list (tracklet,frame)")
        return read_tracklet_csv(source)
    return find_tracklets(source)


def _frame_problem(path: str) -> str | None:
    """None when ``path`` decodes fully (as the loader decodes it), else the reason, naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except UnidentifiedImageError:
        return f"cannot decode frame {path}: not an image in a known format"
    except FileNotFoundError:
        return f"frame not found: {path}"
    except (OSError, ValueError, SyntaxError) as err:
        return f"cannot decode frame {path}: {getattr(err, 'strerror', None) or err}"
    return None


def check_frames(tracklets, *, skip_bad: bool, threads: int | None = None):
    """Decode every frame once, with the loader's decoder. Returns (tracklets of good frames,
    skipped counts per tracklet, [(path, reason)] of bad frames, names of tracklets left with no
    frame). Without ``skip_bad`` the first bad frame is a :class:`UserError` naming its path."""
    paths = [p for _, frames in tracklets for p in frames]
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        problems = dict(zip(paths, pool.map(_frame_problem, paths, chunksize=64)))
    bad = [(p, r) for p, r in problems.items() if r is not None]
    if bad and not skip_bad:
        more = f" ({len(bad) - 1} more bad frames)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0][1]}{more}; --skip-bad leaves bad frames out")
    good, skipped, empty = [], [], []
    for name, frames in tracklets:
        ok = [p for p in frames if problems[p] is None]
        if ok:
            good.append((name, ok))
            skipped.append(len(frames) - len(ok))
        else:
            empty.append(name)
    if not good:
        raise UserError("every frame is unreadable: nothing to describe")
    return good, skipped, bad, empty


def write_outputs(out: Path, names, frames, skipped, descriptors: np.ndarray, settings: dict):
    out.mkdir(parents=True, exist_ok=True)
    npy, index = out / "descriptors.npy", out / "index.csv"
    tmp = out / "descriptors.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, descriptors.astype(np.float32))
    os.replace(tmp, npy)
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(INDEX_COLUMNS)
        for row, (name, paths, skip) in enumerate(zip(names, frames, skipped)):
            w.writerow((row, name, len(paths), skip, paths[len(paths) // 2]))
    (out / "extract.json").write_text(json.dumps(settings, indent=2) + "\n")
    return npy, index


def extract(model, tracklets, *, frames: int, height: int, width: int, normalize: bool = False,
            **kw) -> np.ndarray:
    """float32 [T, D] descriptors of ``tracklets`` [(name, frame paths)], the test protocol."""
    from fastnl.evaluation import extract_descriptors

    desc = extract_descriptors(model, [(tuple(p), 0, 0) for _, p in tracklets], frames=frames,
                               height=height, width=width, desc="tracklets", **kw)
    if normalize:
        desc = torch.nn.functional.normalize(desc, dim=1)
    return desc.numpy().astype(np.float32)


def load_index(descriptors) -> tuple[np.ndarray, list[dict], Path]:
    """(descriptors [T, D], index rows, folder) from ``descriptors.npy`` or its folder."""
    path = Path(descriptors)
    if path.is_dir():
        path = path / "descriptors.npy"
    if not path.is_file():
        raise UserError(f"descriptors not found: {path} (write them with `fastnl extract`)")
    index = path.parent / "index.csv"
    if not index.is_file():
        raise UserError(f"index not found: {index} (it is written beside descriptors.npy by "
                        "`fastnl extract`)")
    try:
        desc = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    if desc.ndim != 2 or len(rows) != len(desc):
        raise UserError(f"{path} holds {desc.shape} descriptors but {index} lists {len(rows)} "
                        "tracklets: write both with the same `fastnl extract`")
    if rows and not set(INDEX_COLUMNS) <= set(rows[0]):
        raise UserError(f"{index}: expected the columns {','.join(INDEX_COLUMNS)}")
    return desc, rows, path.parent


def find_query(rows: list[dict], query: str) -> int:
    """Row of the tracklet named ``query`` (its name in index.csv, or a unique name ending
    with it)."""
    names = [r["tracklet"] for r in rows]
    q = query.rstrip("/").replace(os.sep, "/")
    if q in names:
        return names.index(q)
    ends = [i for i, n in enumerate(names) if n.endswith("/" + q)]
    if len(ends) == 1:
        return ends[0]
    if len(ends) > 1:
        raise UserError(f"--query {query!r} matches {len(ends)} tracklets "
                        f"({names[ends[0]]}, {names[ends[1]]}, ...): give more of its path")
    import difflib

    close = difflib.get_close_matches(q, names, n=3)
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise UserError(f"--query {query!r} is not a tracklet of index.csv{hint}")


def nearest(desc: np.ndarray, qi: int, top: int) -> list[tuple[int, float]]:
    """[(row, L2 distance)] of the ``top`` tracklets nearest row ``qi``, itself left out; ties
    by row order."""
    from fastnl.metrics import l2_distances

    x = torch.from_numpy(np.ascontiguousarray(desc, dtype=np.float32))
    d = l2_distances(x[qi:qi + 1], x)[0].numpy()
    order = [int(j) for j in np.argsort(d, kind="stable") if j != qi][:top]
    return [(j, float(d[j])) for j in order]


def draw_search(rows: list[dict], qi: int, hits, path: Path,
                cell: tuple[int, int] = (128, 64)) -> Path:
    """A PNG strip: the query's middle frame, then each hit's with its rank and distance."""
    from PIL import Image, ImageDraw, ImageOps

    h, w = cell
    pad, gap, label = 4, 12, 28
    strip = Image.new("RGB", ((len(hits) + 1) * (w + 2 * pad) + gap, h + 2 * pad + label), "white")
    draw = ImageDraw.Draw(strip)

    def tile(row, colour):
        try:
            img = Image.open(rows[row]["middle_frame"]).convert("RGB").resize((w, h))
        except OSError:
            img = Image.new("RGB", (w, h), (200, 200, 200))
        return ImageOps.expand(img, border=pad, fill=colour)

    strip.paste(tile(qi, (60, 60, 60)), (0, 0))
    draw.text((2, h + 2 * pad), "query", fill="black")
    for col, (j, dist) in enumerate(hits, start=1):
        x = col * (w + 2 * pad) + gap
        strip.paste(tile(j, (70, 130, 200)), (x, 0))
        draw.text((x + 2, h + 2 * pad), f"{col}: {dist:.3f}", fill="black")
        draw.text((x + 2, h + 2 * pad + 12), Path(rows[j]["tracklet"]).name[:10], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path
