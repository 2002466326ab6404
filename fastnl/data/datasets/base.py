"""Shared parts of the video re-ID readers: the tracklet lists, the counts table, the checks.

A tracklet is ``(tuple of frame paths, pid, camid)``; camids are 0-based. Train pids are
relabelled to ``0 .. num_train_pids - 1`` in increasing order of the original pid (torchreid
convention); query and gallery keep the original pids so that they can be matched.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from fastnl.errors import UserError

Tracklet = tuple[tuple[str, ...], int, int]


class DatasetError(UserError):
    """The dataset on disk is missing, incomplete or malformed; the message names the path."""


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise :class:`DatasetError` naming it."""
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} (expected a folder)")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise :class:`DatasetError` naming it."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path} (expected a file)")
    return path


def relabel(tracklets: Sequence[Tracklet]) -> list[Tracklet]:
    """Map pids to ``0 .. n-1`` in increasing order of the original pid."""
    label = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in tracklets}))}
    return [(paths, label[pid], camid) for paths, pid, camid in tracklets]


def list_frames(folder: Path, ext: str) -> tuple[list[str], int]:
    """(sorted paths of the ``ext`` files in ``folder``, count of other files there)."""
    frames, other = [], 0
    for entry in os.scandir(folder):
        if not entry.is_file():
            continue
        if entry.name.lower().endswith(ext):
            frames.append(entry.path)
        else:
            other += 1
    frames.sort()
    return frames, other


class FolderIndex:
    """Listings of frame folders, each read once, to check that listed frames exist."""

    def __init__(self):
        self._names: dict[str, frozenset] = {}

    def missing(self, paths: Iterable[str]) -> list[str]:
        """The paths among ``paths`` that are not files on disk."""
        out = []
        for path in paths:
            folder, name = os.path.split(path)
            names = self._names.get(folder)
            if names is None:
                try:
                    names = frozenset(e.name for e in os.scandir(folder) if e.is_file())
                except OSError:
                    names = frozenset()
                self._names[folder] = names
            if name not in names:
                out.append(path)
        return out


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _read(path: str) -> tuple[bytes | None, str | None]:
    """(the bytes of ``path``, None), or (None, why it cannot be read). A path that is not a
    regular file is refused before anything is read: it is opened non-blocking, so a FIFO
    does not block the read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        return None, f"cannot read it: {err.strerror or err}"
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return None, (f"it is {_file_kind(mode)}, not a regular file: replace it with the JPEG "
                          "file or remove it from the dataset")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(), None
    except OSError as err:
        return None, f"cannot read it: {err.strerror or err}"
    finally:
        os.close(fd)


def read_bytes(path: str) -> bytes:
    """The bytes of the frame file ``path``; a :class:`DatasetError` naming it when it is
    missing, unreadable or not a regular file (e.g. a FIFO)."""
    data, reason = _read(path)
    if data is None:
        raise DatasetError(f"frame {path}: {reason}")
    return data


def check_jpeg(path: str) -> str | None:
    """Decode ``path`` fully (at 1/8 scale: every entropy-coded byte is still read), and check
    the entropy-coded data with libjpeg's own warnings, which Pillow drops (see
    :mod:`fastnl.data.jpeg_check`): garbled bytes inside a complete file are found too.

    Returns None when it decodes cleanly, else the reason.
    """
    from fastnl.data.jpeg_check import corrupt_data

    data, reason = _read(path)
    if data is None:
        return reason
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except (OSError, ValueError, SyntaxError) as err:
        return str(err) or type(err).__name__
    return corrupt_data(data)


def verify_frames(paths: Sequence[str], threads: int | None = None) -> None:
    """Decode every frame; raise :class:`DatasetError` naming the first bad one and the count.
    Frames with garbled data (libjpeg's "Corrupt JPEG data" warnings) count as bad; so does
    anything that is not a regular file."""
    from fastnl.data.jpeg_check import available

    reason = available()
    if reason is not None:
        warnings.warn(f"--verify cannot check the entropy-coded data of the frames here ({reason}): "
                      "only undecodable frames are found", stacklevel=2)
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(check_jpeg, paths, chunksize=256))
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad:
        path, reason = bad[0]
        more = f" ({len(bad) - 1} more bad frames)" if len(bad) > 1 else ""
        raise DatasetError(f"unreadable frame: {path}: {reason}{more}")


class VideoDataset:
    """A video re-ID dataset: ``train``, ``query``, ``gallery`` lists of tracklets.

    ``notes`` records what the reader set aside (e.g. junk tracklets), shown by ``summary()``
    and issued once as a warning, so nothing is dropped silently.
    """

    name = "video"

    def __init__(self, root, train: list[Tracklet], query: list[Tracklet],
                 gallery: list[Tracklet], *, notes: Sequence[str] = (), verify: bool = False):
        self.root = str(root)
        self.train = train
        self.query = query
        self.gallery = gallery
        self.notes = list(notes)
        self.num_train_pids = len({pid for _, pid, _ in train})
        for split, tracklets in (("train", train), ("query", query), ("gallery", gallery)):
            if not tracklets:
                raise DatasetError(f"{self.name}: no {split} tracklets found under {self.root}")
        for note in self.notes:
            warnings.warn(f"{self.name} ({self.root}): {note}", stacklevel=3)
        if verify:
            verify_frames([p for split in (train, query, gallery) for paths, _, _ in split
                           for p in paths])

    def summary(self) -> str:
        """The counts per split (ids, tracklets, frames, cameras) as a text table."""
        rows = []
        for split, tracklets in (("train", self.train), ("query", self.query),
                                 ("gallery", self.gallery)):
            rows.append((split, len({t[1] for t in tracklets}), len(tracklets),
                         sum(len(t[0]) for t in tracklets), len({t[2] for t in tracklets})))
        head = ("subset", "# ids", "# tracklets", "# frames", "# cameras")
        lines = [f"{self.name} ({self.root})",
                 "  {:<8} | {:>6} | {:>11} | {:>9} | {:>9}".format(*head),
                 "  " + "-" * 56]
        lines += ["  {:<8} | {:>6} | {:>11} | {:>9} | {:>9}".format(*r) for r in rows]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
