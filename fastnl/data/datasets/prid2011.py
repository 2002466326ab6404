"""PRID-2011 (Hirzer et al., SCIA 2011), multi-shot version, in its official release layout.

::

    root/prid_2011/multi_shot/cam_a/person_0001/0001.png ...   385 persons
    root/prid_2011/multi_shot/cam_b/person_0001/...            749 persons
    root/splits_prid2011.json                                  optional: torchreid's splits

(``root`` may also be the ``prid_2011`` folder itself.) Persons 1..200 are seen by both
cameras; a folder number above 200 is a different person in each camera and is never used.

The standard video protocol (Wang et al. ECCV'14, McLaughlin et al. CVPR'16, and the 178-id
table ``train_test_splits_prid.mat`` that ships with iLIDS-VID) keeps 178 of those 200
persons. The papers word the criterion as "sequences of more than 21 frames", but a public
reader that checks its counts on the release asserts 183 persons (of 1..200) with at least 21
frames in each camera and 178 with at least 27, the ids of that table: ``min_frames``
defaults to 27. The
identities are then split 10 times at random, half for training and half for testing; the
splits are made here from ``seed`` (deterministically), or read from a splits file in
torchreid's format (a JSON list of ``{"train": [folder names], "test": [folder names]}``):
``splits=PATH``, or ``root/splits_prid2011.json`` when it exists (torchreid's place). A
splits file fixes the identities itself: ``min_frames`` is not applied to it.

Query = the cam_a sequence and gallery = the cam_b sequence of each test id (pid = person
number); train = both sequences of the train ids, relabelled. camid 0 = cam_a, 1 = cam_b.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import DatasetError, require_dir
from .ilidsvid import TwoCameraDataset, check_split_id, person_folders

PERSON = re.compile(r"^person_(\d+)$")
SEEN_BY_BOTH = 200
MIN_FRAMES = 27
NUM_SPLITS = 10
SPLITS_JSON = "splits_prid2011.json"


def _count_png(folder: Path) -> int:
    return sum(1 for e in folder.iterdir() if e.is_file() and e.name.lower().endswith(".png"))


def make_splits(names: list[str], num_splits: int = NUM_SPLITS, seed: int = 0) -> list[dict]:
    """``num_splits`` random half/half splits of ``names`` (test = the first half of each
    permutation, n // 2 ids), fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    half = len(names) // 2
    out = []
    for _ in range(num_splits):
        perm = rng.permutation(len(names))
        out.append({"train": sorted(names[i] for i in perm[half:]),
                    "test": sorted(names[i] for i in perm[:half])})
    return out


def read_splits(path: Path, known: set[str]) -> list[dict]:
    """Splits in torchreid's JSON format, checked against the person folders ``known``."""
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read splits file {path}: {err}") from None
    if not isinstance(splits, list) or not splits:
        raise DatasetError(f"{path}: expected a non-empty JSON list of "
                           '{"train": [...], "test": [...]} splits')
    for s, split in enumerate(splits):
        if not isinstance(split, dict) or not all(isinstance(split.get(k), list)
                                                  for k in ("train", "test")):
            raise DatasetError(f"{path}: split {s} is not an object with 'train' and 'test' "
                               "lists of person folder names")
        for key in ("train", "test"):
            unknown = [n for n in split[key] if n not in known]
            if unknown:
                raise DatasetError(f"{path}: split {s} {key} names {unknown[0]!r}, which is not "
                                   "a person folder of both cameras (persons 1..200)")
        both = set(split["train"]) & set(split["test"])
        if both:
            raise DatasetError(f"{path}: split {s} puts {sorted(both)[0]!r} in train and test")
    return [{"train": list(s["train"]), "test": list(s["test"])} for s in splits]


def find_multishot(root: Path) -> Path:
    for base in (root / "prid_2011" / "multi_shot", root / "multi_shot"):
        if base.is_dir():
            return base
    require_dir(root, "PRID-2011 root")
    raise DatasetError(f"PRID-2011 multi-shot folder not found: {root / 'prid_2011' / 'multi_shot'} "
                       "(expected prid_2011/multi_shot/cam_a and cam_b)")


class PRID2011(TwoCameraDataset):
    """PRID-2011 reader (multi-shot), split ``split_id`` of 10. ``verify=True`` decodes every
    frame at construction."""

    name = "prid2011"

    def __init__(self, root, split_id: int = 0, *, splits=None, seed: int = 0,
                 min_frames: int = MIN_FRAMES, num_splits: int = NUM_SPLITS,
                 verify: bool = False):
        root = Path(root)
        base = find_multishot(root)
        cam_dirs = tuple(require_dir(base / c, f"PRID-2011 {c} folder") for c in ("cam_a", "cam_b"))
        folders = [person_folders(d, PERSON, "person_0001") for d in cam_dirs]
        both = sorted(n for n, num in folders[0].items()
                      if num <= SEEN_BY_BOTH and n in folders[1])
        if not both:
            raise DatasetError(f"{base}: no person folder numbered 1..{SEEN_BY_BOTH} in both "
                               "cam_a and cam_b")
        notes = []
        splits_path = Path(splits) if splits is not None else root / SPLITS_JSON
        if splits is not None or splits_path.is_file():
            if not splits_path.is_file():
                raise DatasetError(f"PRID-2011 splits file not found: {splits_path} (expected a file)")
            self.splits = read_splits(splits_path, set(both))
            self.splits_source = str(splits_path)
        else:
            kept = [n for n in both
                    if min(_count_png(cam_dirs[0] / n), _count_png(cam_dirs[1] / n)) >= min_frames]
            if len(kept) < 2:
                raise DatasetError(f"{base}: only {len(kept)} of the {len(both)} persons seen by "
                                   f"both cameras have at least {min_frames} frames in each: "
                                   "nothing to split")
            notes.append(f"kept {len(kept)} of the {len(both)} persons seen by both cameras "
                         f"(those with at least {min_frames} frames in each; 178 on the release)")
            self.splits = make_splits(kept, num_splits, seed)
            self.splits_source = f"{num_splits} random half/half splits, seed {seed}"
        self.split_id, self.num_splits = split_id, len(self.splits)
        check_split_id(split_id, self.num_splits, self.splits_source)
        self._build(root, cam_dirs, folders[0], self.splits[split_id], notes, verify)
