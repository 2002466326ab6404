"""DukeMTMC-VideoReID (Wu et al., CVPR 2018) in its official release layout.

::

    root/train/<pid>/<tracklet>/<pid>_C<cam>_F<frame>_X<index>.jpg   e.g. 0001_C6_F0001_X00001.jpg
    root/query/..., root/gallery/...                                  the same layout

Frames of a tracklet are ordered by their F number (some tracklets start at F0002, as in the
release). The older name form ``0001C6F0001X00001.jpg`` is read too. The gallery holds the
408 distractor ids of the release as ordinary pids that no query shares. Files other than
``.jpg`` are ignored and counted in ``notes``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .base import DatasetError, Tracklet, VideoDataset, relabel, require_dir

FRAME_NAME = re.compile(r"^(\d+)_?C(\d+)_?F(\d+)_?X(\d+)\.jpg$", re.IGNORECASE)


def _subdirs(folder: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if e.is_dir()), key=lambda e: e.name)


class DukeVideo(VideoDataset):
    """DukeMTMC-VideoReID reader. ``verify=True`` decodes every frame at construction."""

    name = "dukevideo"

    def __init__(self, root, verify: bool = False):
        root = require_dir(Path(root), "DukeMTMC-VideoReID root")
        self._ignored = 0
        splits = {split: self._read_split(require_dir(root / split, f"DukeMTMC-VideoReID {split} "
                                                      "folder"))
                  for split in ("train", "query", "gallery")}
        notes = [f"ignored {self._ignored} files that are not .jpg frames"] if self._ignored else []
        super().__init__(root, relabel(splits["train"]), splits["query"], splits["gallery"],
                         notes=notes, verify=verify)

    def _read_split(self, folder: Path) -> list[Tracklet]:
        tracklets = []
        for pdir in _subdirs(folder):
            if not pdir.name.isdigit():
                raise DatasetError(f"unexpected folder {pdir.path}: identity folders are numbers")
            pid = int(pdir.name)
            for tdir in _subdirs(Path(pdir.path)):
                tracklets.append(self._read_tracklet(Path(tdir.path), pid))
        return tracklets

    def _read_tracklet(self, tdir: Path, pid: int) -> Tracklet:
        frames = []
        cams = set()
        for entry in os.scandir(tdir):
            if not entry.name.lower().endswith(".jpg"):
                self._ignored += 1
                continue
            if not entry.is_file():
                raise DatasetError(f"frame {entry.path} is not a regular file (a folder, FIFO or "
                                   "device): replace it with the JPEG file or remove it")
            m = FRAME_NAME.match(entry.name)
            if m is None:
                raise DatasetError(f"frame name not understood: {entry.path} (expected "
                                   "<pid>_C<cam>_F<frame>_X<index>.jpg)")
            if int(m.group(1)) != pid:
                raise DatasetError(f"frame {entry.path} names pid {m.group(1)} inside the folder "
                                   f"of pid {pid}")
            cams.add(int(m.group(2)))
            frames.append((int(m.group(3)), entry.name, entry.path))
        if not frames:
            raise DatasetError(f"empty tracklet: {tdir} holds no .jpg frames")
        if len(cams) != 1:
            raise DatasetError(f"tracklet {tdir} mixes cameras {sorted(cams)}")
        cam = cams.pop()
        if cam < 1:
            raise DatasetError(f"tracklet {tdir}: camera numbers start at C1, found C{cam}")
        frames.sort()
        return tuple(path for _, _, path in frames), pid, cam - 1
