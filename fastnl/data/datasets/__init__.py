"""Video re-ID datasets by name: ``get_dataset("mars" | "dukevideo" | "ilidsvid" | "prid2011"
| "synthetic", root)``.

``synthetic`` is a folder written by ``fastnl synth``: its format (one of the official layouts)
is read from the ``synth.json`` it holds, or else recognised from the folders. iLIDS-VID and
PRID-2011 come with 10 train/test splits: ``split_id`` (0..9) chooses one.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import DatasetError, Tracklet, VideoDataset
from .dukevideo import DukeVideo
from .ilidsvid import ILIDSVID
from .mars import MARS
from .prid2011 import PRID2011

DATASETS = ("mars", "dukevideo", "ilidsvid", "prid2011", "synthetic")
_READERS = {"mars": MARS, "dukevideo": DukeVideo, "ilidsvid": ILIDSVID, "prid2011": PRID2011}
SPLIT_DATASETS = ("ilidsvid", "prid2011")
SYNTH_MARKER = "synth.json"


def detect_format(root) -> str:
    """The reader name (``"mars"``, ``"dukevideo"``, ``"ilidsvid"``, ``"prid2011"``) for a
    folder in one of the official layouts."""
    root = Path(root)
    marker = root / SYNTH_MARKER
    if marker.is_file():
        try:
            fmt = json.loads(marker.read_text()).get("format")
        except (ValueError, AttributeError):
            raise DatasetError(f"{marker} is not a valid synthetic dataset description") from None
        if fmt in _READERS:
            return fmt
        raise DatasetError(f"{marker}: unknown format {fmt!r} (expected one of "
                           f"{', '.join(_READERS)})")
    if (root / "info").is_dir() or (root / "bbox_train").is_dir():
        return "mars"
    if (root / "query").is_dir() or (root / "gallery").is_dir():
        return "dukevideo"
    if (root / "i-LIDS-VID").is_dir():
        return "ilidsvid"
    if (root / "prid_2011").is_dir() or (root / "multi_shot").is_dir():
        return "prid2011"
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    raise DatasetError(f"{root} is not a MARS folder (info/, bbox_train/, bbox_test/), a "
                       "DukeMTMC-VideoReID folder (train/, query/, gallery/), an iLIDS-VID folder "
                       "(i-LIDS-VID/sequences/) or a PRID-2011 folder (prid_2011/multi_shot/); "
                       "write one with `fastnl synth`")


def resolve_name(name: str, root) -> str:
    """The reader behind ``name`` (``synthetic`` resolved from the folder)."""
    if name == "synthetic":
        return detect_format(root)
    if name not in _READERS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return name


def get_dataset(name: str, root, split_id: int | None = None, **kwargs) -> VideoDataset:
    """Read the dataset ``name`` (one of :data:`DATASETS`) from ``root``; ``split_id`` for the
    datasets with several splits (:data:`SPLIT_DATASETS`; default split 0)."""
    name = resolve_name(name, root)
    if split_id is not None:
        if name not in SPLIT_DATASETS:
            raise DatasetError(f"{name} has one fixed train/test split: a split id applies to "
                               f"{' and '.join(SPLIT_DATASETS)} only")
        kwargs["split_id"] = split_id
    return _READERS[name](root, **kwargs)


__all__ = ["DATASETS", "DatasetError", "DukeVideo", "ILIDSVID", "MARS", "PRID2011",
           "SPLIT_DATASETS", "Tracklet", "VideoDataset", "detect_format", "get_dataset",
           "resolve_name"]
