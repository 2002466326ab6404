"""Video re-ID datasets by name: ``get_dataset("mars" | "dukevideo" | "synthetic", root)``.

``synthetic`` is a folder written by ``fastnl synth``: its format (MARS or DukeMTMC-VideoReID
layout) is read from the ``synth.json`` it holds, or else recognised from the folders.
"""
from __future__ import annotations

import json
from pathlib import Path

from .base import DatasetError, Tracklet, VideoDataset
from .dukevideo import DukeVideo
from .mars import MARS

DATASETS = ("mars", "dukevideo", "synthetic")
_READERS = {"mars": MARS, "dukevideo": DukeVideo}
SYNTH_MARKER = "synth.json"


def detect_format(root) -> str:
    """``"mars"`` or ``"dukevideo"`` for a folder in one of the two official layouts."""
    root = Path(root)
    marker = root / SYNTH_MARKER
    if marker.is_file():
        try:
            fmt = json.loads(marker.read_text()).get("format")
        except (ValueError, AttributeError):
            raise DatasetError(f"{marker} is not a valid synthetic dataset description") from None
        if fmt in _READERS:
            return fmt
        raise DatasetError(f"{marker}: unknown format {fmt!r} (expected mars or dukevideo)")
    if (root / "info").is_dir() or (root / "bbox_train").is_dir():
        return "mars"
    if (root / "query").is_dir() or (root / "gallery").is_dir():
        return "dukevideo"
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    raise DatasetError(f"{root} is neither a MARS folder (info/, bbox_train/, bbox_test/) nor a "
                       "DukeMTMC-VideoReID folder (train/, query/, gallery/); write one with "
                       "`fastnl synth`")


def get_dataset(name: str, root, **kwargs) -> VideoDataset:
    """Read the dataset ``name`` (one of :data:`DATASETS`) from ``root``."""
    if name == "synthetic":
        name = detect_format(root)
    if name not in _READERS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return _READERS[name](root, **kwargs)


__all__ = ["DATASETS", "DatasetError", "DukeVideo", "MARS", "Tracklet", "VideoDataset",
           "detect_format", "get_dataset"]
