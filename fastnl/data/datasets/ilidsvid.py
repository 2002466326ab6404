"""iLIDS-VID (Wang et al., ECCV 2014) in its official release layout.

::

    root/i-LIDS-VID/sequences/cam1/person001/cam1_person001_00317.png ...
    root/i-LIDS-VID/sequences/cam2/person001/...
    root/train-test people splits/train_test_splits_ilidsvid.mat
        ls_set: [10, 300], row s = a permutation of 1..300, 1-based indices into the person
        folders sorted by name; the first half of the row are the test ids of split s, the
        second half its train ids (Wang et al. ECCV'14, as torchreid reads it)

Each person has one sequence per camera. Train = both sequences of the split's train ids
(pids relabelled 0..149 in person order); query = the cam1 sequence and gallery = the cam2
sequence of each test id, which keep the person number as pid (person001 -> 1). camid 0 =
cam1, 1 = cam2. Frames are ordered by name (their frame numbers are zero-padded); files
other than ``.png`` are ignored and counted in ``notes``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import DatasetError, VideoDataset, list_frames, relabel, require_dir
from .mars import load_mat

PERSON = re.compile(r"^person(\d+)$")
CAMS = ("cam1", "cam2")
SPLITS_FILE = Path("train-test people splits") / "train_test_splits_ilidsvid.mat"


def person_folders(cam_dir: Path, pattern: re.Pattern, example: str) -> dict[str, int]:
    """{folder name: person number} of the identity folders of a camera, sorted by name."""
    out = {}
    for entry in sorted(cam_dir.iterdir()):
        if not entry.is_dir():
            continue
        m = pattern.match(entry.name)
        if m is None:
            raise DatasetError(f"unexpected folder {entry}: identity folders are named like "
                               f"{example}")
        out[entry.name] = int(m.group(1))
    if not out:
        raise DatasetError(f"no identity folders in {cam_dir}")
    return out


def read_split_table(path: Path, key: str, num_ids: int) -> np.ndarray:
    """The [splits, ids] table of 1-based person indices, as 0-based int64, every row checked."""
    table = load_mat(path, key, what="iLIDS-VID splits file")
    if table.ndim != 2 or table.shape[1] != num_ids or table.shape[0] == 0:
        raise DatasetError(f"{path}: '{key}' has shape {table.shape}, expected [num_splits, "
                           f"{num_ids}] (one row per split over the {num_ids} persons found)")
    if not np.issubdtype(table.dtype, np.number) or not np.all(table == np.round(table)):
        raise DatasetError(f"{path}: '{key}' must hold integers")
    table = table.astype(np.int64)
    for s, row in enumerate(table):
        if sorted(row.tolist()) != list(range(1, num_ids + 1)):
            raise DatasetError(f"{path}: row {s + 1} of '{key}' is not a permutation of "
                               f"1..{num_ids}")
    return table - 1


def check_split_id(split_id: int, num_splits: int, source) -> None:
    if not 0 <= split_id < num_splits:
        raise DatasetError(f"split id {split_id} out of range: {source} holds {num_splits} "
                           f"splits (0..{num_splits - 1})")


class TwoCameraDataset(VideoDataset):
    """One sequence per (person, camera); query = camera A, gallery = camera B of the test ids."""

    split_id: int
    num_splits: int
    splits: list[dict]  # [{"train": [folder names], "test": [folder names]}] as in torchreid

    def _build(self, root, cam_dirs: tuple[Path, Path], numbers: dict[str, int],
               split: dict, notes: list[str], verify: bool) -> None:
        self._ignored = 0

        def seq(name, cam):
            folder = cam_dirs[cam] / name
            frames, other = list_frames(folder, ".png")
            self._ignored += other
            if not frames:
                raise DatasetError(f"empty tracklet: {folder} holds no .png frames")
            return tuple(frames), numbers[name], cam

        train = [seq(n, c) for n in split["train"] for c in (0, 1)]
        query = [seq(n, 0) for n in split["test"]]
        gallery = [seq(n, 1) for n in split["test"]]
        if self._ignored:
            notes.append(f"ignored {self._ignored} files that are not .png frames")
        super().__init__(root, relabel(train), query, gallery, notes=notes, verify=verify)


class ILIDSVID(TwoCameraDataset):
    """iLIDS-VID reader, split ``split_id`` (0..9) of the official table.

    ``verify=True`` decodes every frame at construction.
    """

    name = "ilidsvid"

    def __init__(self, root, split_id: int = 0, verify: bool = False):
        root = require_dir(Path(root), "iLIDS-VID root")
        seq_dir = require_dir(root / "i-LIDS-VID" / "sequences", "iLIDS-VID sequences folder")
        cam_dirs = tuple(require_dir(seq_dir / c, f"iLIDS-VID {c} folder") for c in CAMS)
        folders = [person_folders(d, PERSON, "person001") for d in cam_dirs]
        if set(folders[0]) != set(folders[1]):
            only = sorted(set(folders[0]) ^ set(folders[1]))
            raise DatasetError(f"{seq_dir}: cam1 and cam2 must hold the same persons; "
                               f"{len(only)} are in one camera only, e.g. {only[0]}")
        names = sorted(folders[0])
        table = root / SPLITS_FILE
        rows = read_split_table(table, "ls_set", len(names))
        self.split_id, self.num_splits = split_id, len(rows)
        check_split_id(split_id, self.num_splits, table)
        half = len(names) // 2
        self.splits = [{"train": sorted(names[i] for i in idx[half:]),
                        "test": sorted(names[i] for i in idx[:half])} for idx in rows]
        self._build(root, cam_dirs, folders[0], self.splits[split_id], [], verify)
