"""MARS (Zheng et al., ECCV 2016) in its official release layout.

::

    root/bbox_train/0001/0001C1T0001F001.jpg   pid 0001, camera 1, tracklet 0001, frame 001
    root/bbox_test/0000/..., root/bbox_test/00-1/...
    root/info/train_name.txt, test_name.txt    one frame name per line
    root/info/tracks_train_info.mat            track_train_info: rows (start, end, pid, camid),
    root/info/tracks_test_info.mat             track_test_info   start/end 1-based, inclusive,
                                               into the name list of the split
    root/info/query_IDX.mat                    query_IDX: 1-based rows of track_test_info that
                                               are queries; every other test row is gallery

Junk and distractors, as the official MARS evaluation (``evaluation_mars``, Market-1501 code)
handles them: pid -1 tracklets are *junk* (bad detections): the official code puts them in
each query's junk list, so they neither count as matches nor as errors. Removing them from
query and gallery at load time gives the same CMC and mAP (torchreid does the same), and the
count is reported in ``notes``. pid 0 tracklets are *distractors* (people outside the
labelled set): the official code keeps them as gallery negatives, so they stay in the gallery
with pid 0, which matches no query.
"""
from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import scipy.io

from .base import (DatasetError, FolderIndex, Tracklet, VideoDataset, relabel, require_dir,
                   require_file)

NUM_CAMS = 6


def pid_folder(pid: int) -> str:
    """The 4-character pid field of MARS names and folders: 0001, 0000, 00-1."""
    return str(pid).rjust(4, "0")


def read_names(path: Path) -> list[str]:
    """Frame names, one per line, blank lines skipped."""
    require_file(path, "MARS frame list")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_mat(path: Path, key: str, what: str = "MARS info file") -> np.ndarray:
    """The array ``key`` from a MATLAB file, with a clear error when absent or unreadable."""
    require_file(path, what)
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises several types for a malformed file
        raise DatasetError(f"cannot read MATLAB file {path}: {err}") from None
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{path} has no variable '{key}' (found: {', '.join(found) or 'none'})")
    return np.asarray(mat[key])


def load_tracks(path: Path, key: str, num_names: int) -> np.ndarray:
    """Track rows ``(start, end, pid, camid)`` as int64 [T, 4], checked against the name list."""
    info = load_mat(path, key)
    if info.ndim != 2 or info.shape[1] != 4 or info.shape[0] == 0:
        raise DatasetError(f"{path}: '{key}' has shape {info.shape}, expected [num_tracks, 4] "
                           "(start, end, pid, camid)")
    if not np.issubdtype(info.dtype, np.number) or not np.all(np.isfinite(info)) \
            or not np.all(info == np.round(info)):
        raise DatasetError(f"{path}: '{key}' must hold integers")
    info = info.astype(np.int64)
    for row, (start, end, pid, camid) in enumerate(info, start=1):
        if end < start:
            raise DatasetError(f"{path}: row {row} is an empty tracklet "
                               f"(start {start} > end {end})")
        if start < 1 or end > num_names:
            raise DatasetError(f"{path}: row {row} frames {start}..{end} outside the name list "
                               f"(1..{num_names})")
        if not 1 <= camid <= NUM_CAMS:
            raise DatasetError(f"{path}: row {row} camera {camid} not in 1..{NUM_CAMS}")
    return info


def load_query_rows(path: Path, num_tracks: int) -> np.ndarray:
    """0-based query rows of the test track table."""
    idx = load_mat(path, "query_IDX")
    if idx.ndim > 2 or (idx.ndim == 2 and min(idx.shape) != 1) or idx.size == 0:
        raise DatasetError(f"{path}: 'query_IDX' has shape {idx.shape}, expected a vector")
    idx = idx.reshape(-1)
    if not np.all(idx == np.round(idx)):
        raise DatasetError(f"{path}: 'query_IDX' must hold integers")
    idx = idx.astype(np.int64)
    if idx.min() < 1 or idx.max() > num_tracks:
        raise DatasetError(f"{path}: 'query_IDX' values must lie in 1..{num_tracks} "
                           f"(rows of tracks_test_info), found {idx.min()}..{idx.max()}")
    if len(np.unique(idx)) != len(idx):
        raise DatasetError(f"{path}: 'query_IDX' lists a track more than once")
    return idx - 1


class MARS(VideoDataset):
    """MARS reader. ``verify=True`` decodes every frame at construction."""

    name = "mars"

    def __init__(self, root, verify: bool = False):
        root = require_dir(Path(root), "MARS root")
        info = require_dir(root / "info", "MARS info folder")
        self._index = FolderIndex()
        train_names = read_names(info / "train_name.txt")
        test_names = read_names(info / "test_name.txt")
        train_info = load_tracks(info / "tracks_train_info.mat", "track_train_info",
                                 len(train_names))
        test_info = load_tracks(info / "tracks_test_info.mat", "track_test_info",
                                len(test_names))
        query_rows = load_query_rows(info / "query_IDX.mat", len(test_info))
        is_query = np.zeros(len(test_info), dtype=bool)
        is_query[query_rows] = True

        bbox_train = require_dir(root / "bbox_train", "MARS train frames")
        bbox_test = require_dir(root / "bbox_test", "MARS test frames")
        train = self._tracklets(bbox_train, train_names, train_info, info / "train_name.txt")
        test = self._tracklets(bbox_test, test_names, test_info, info / "test_name.txt")
        query = [t for t, q in zip(test, is_query) if q]
        gallery = [t for t, q in zip(test, is_query) if not q]

        notes = []
        junk_train = sum(1 for t in train if t[1] == -1)
        if junk_train:
            raise DatasetError(f"{info / 'tracks_train_info.mat'}: {junk_train} train tracks "
                               "have pid -1 (junk belongs to the test split only)")
        junk_q = sum(1 for t in query if t[1] == -1)
        junk_g = sum(1 for t in gallery if t[1] == -1)
        if junk_q or junk_g:
            notes.append(f"ignored {junk_q + junk_g} junk tracklets (pid -1: {junk_q} query, "
                         f"{junk_g} gallery), as the official MARS evaluation does")
            query = [t for t in query if t[1] != -1]
            gallery = [t for t in gallery if t[1] != -1]
        super().__init__(root, relabel(train), query, gallery, notes=notes, verify=verify)

    def _tracklets(self, folder: Path, names: list[str], info: np.ndarray,
                   names_file: Path) -> list[Tracklet]:
        tracklets = []
        for start, end, pid, camid in info:
            frames = names[start - 1:end]
            prefix = pid_folder(int(pid))
            for name in frames:
                if name[:4] != prefix or name[4:6] != f"C{camid}":
                    raise DatasetError(f"{names_file}: frame {name} listed in a track of pid "
                                       f"{pid}, camera {camid} (names are <pid>C<cam>T..F...jpg)")
            tracklets.append((tuple(str(folder / prefix / n) for n in frames), int(pid),
                              int(camid) - 1))
        missing = self._index.missing(p for paths, _, _ in tracklets for p in paths)
        if missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            if os.path.lexists(missing[0]):
                raise DatasetError(f"frame listed in {names_file} is not a regular file (a folder, FIFO or "
                                   f"device): {missing[0]}{more}; replace it with the JPEG file")
            raise DatasetError(f"frame listed in {names_file} but absent: {missing[0]}{more}")
        return tracklets
