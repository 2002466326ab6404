"""A small synthetic video re-ID dataset written in the official MARS, DukeMTMC-VideoReID,
iLIDS-VID or PRID-2011 layout (real JPEG/PNG frames, real .mat files), used by the demo and
the tests.

Each identity is a figure with its own clothing colours, pattern and build; each camera has
its own background, light level and tint; each tracklet walks (legs swing, body bobs and
drifts) with per-frame noise. Identities are therefore learnable across cameras but not from
the background alone. Half the ids are train ids, the other half test ids; every test id is
seen by at least two cameras and has one query tracklet, the rest of its tracklets form the
gallery. As in the real releases, the MARS test split also holds distractor tracklets
(pid 0) and junk tracklets (pid -1, bad detections), and the Duke gallery holds distractor
ids that no query shares. iLIDS-VID and PRID-2011 trees have two cameras and one sequence
per person and camera, in PNG: iLIDS-VID with its 10-split table (``ls_set``), PRID-2011 with
persons 1..ids seen by both cameras, others (numbered from 201, as in the release) seen by one
camera only, and tracklets of 20 to 40 frames by default, so the reader's 27-frame rule drops
some persons.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from fastnl.errors import UserError

FORMATS = ("mars", "dukevideo", "ilidsvid", "prid2011")
MAX_CAMS = {"mars": 6, "dukevideo": 8, "ilidsvid": 2, "prid2011": 2}
DEFAULT_CAMS = {"mars": 4, "dukevideo": 4, "ilidsvid": 2, "prid2011": 2}
DEFAULT_FRAMES = {"mars": (4, 16), "dukevideo": (4, 16), "ilidsvid": (4, 16), "prid2011": (20, 40)}
MAX_IDS = {"ilidsvid": 900, "prid2011": 200}
NUM_SPLITS = 10
MARKER = "synth.json"


@dataclass
class _Look:
    """The appearance of one identity."""

    torso: np.ndarray
    legs: np.ndarray
    accent: np.ndarray
    skin: np.ndarray
    pattern: int
    width: float
    height: float


@dataclass
class _Camera:
    background: np.ndarray
    gain: np.ndarray


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return 255 * np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _look(rng: np.random.Generator, hue: float) -> _Look:
    return _Look(
        torso=_hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)),
        legs=_hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.8)),
        accent=_hsv((hue + 0.5) % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)),
        skin=np.array([rng.uniform(150, 235), rng.uniform(110, 190), rng.uniform(80, 160)]),
        pattern=int(rng.integers(0, 4)),
        width=rng.uniform(0.8, 1.15),
        height=rng.uniform(0.9, 1.05),
    )


def _camera(rng: np.random.Generator, h: int, w: int) -> _Camera:
    # A muted background (a grey level with mild colour variation) under a per-camera light:
    # the figure, not the scene, is what tells identities apart.
    coarse = rng.uniform(80, 170) + rng.uniform(-25, 25, size=(4, 2, 3))
    bg = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR),
                    dtype=np.float32)
    floor = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] > rng.uniform(0.75, 0.9)
    bg = np.where(floor, bg * 0.6 + 40, bg)
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, size=3)
    return _Camera(bg.astype(np.float32), gain.astype(np.float32))


class _Renderer:
    """Draws frames of a walking figure on a camera's background."""

    def __init__(self, h: int, w: int, quality: int):
        self.h, self.w, self.quality = h, w, quality
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.yy /= h
        self.xx /= w

    def _box(self, x0, x1, y0, y1):
        return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

    def frame(self, rng, look: _Look | None, cam: _Camera, cx: float, phase: float,
              visible: float = 1.0, fmt: str = "JPEG") -> bytes:
        img = cam.background.copy()
        if look is not None:
            bob = 0.01 * np.sin(2 * phase)
            s = look.height
            top = 0.06 + (1 - s) * 0.5 + bob
            hw = 0.24 * look.width
            swing = 0.07 * np.sin(phase)
            legs_y = top + 0.46 * s
            for dx in (-swing, swing):
                x = cx + dx + (-0.1 if dx < 0 else 0.1) * look.width
                img[self._box(x - 0.09, x + 0.09, legs_y, min(top + 0.9 * s, 0.98))] = look.legs
            torso = self._box(cx - hw, cx + hw, top + 0.16 * s, legs_y)
            img[torso] = look.torso
            if look.pattern == 1:
                img[torso & ((self.yy * 24).astype(int) % 2 == 0)] = look.accent
            elif look.pattern == 2:
                img[torso & (self.xx >= cx)] = look.accent
            elif look.pattern == 3:
                img[self._box(cx - hw, cx + hw, top + 0.36 * s, top + 0.41 * s)] = look.accent
            head = ((self.xx - cx) * self.w / self.h) ** 2 + (self.yy - top - 0.08 * s) ** 2
            img[head < (0.07 * s) ** 2] = look.skin
            if visible < 1.0:
                img[self.yy > visible] = cam.background[self.yy > visible]
        img = img * cam.gain + rng.normal(0, 8, size=img.shape).astype(np.float32)
        buf = io.BytesIO()
        image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        if fmt == "PNG":
            image.save(buf, "PNG", compress_level=1)
        else:
            image.save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()

    def tracklet(self, rng, look, cam, length: int, junk: bool = False,
                 fmt: str = "JPEG") -> list[bytes]:
        cx = rng.uniform(0.4, 0.6)
        drift = rng.uniform(-0.01, 0.01)
        phase, step = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9)
        visible = rng.uniform(0.25, 0.5) if junk else 1.0
        if junk:
            cx += rng.choice([-0.35, 0.35])
        return [self.frame(rng, look, cam, cx + drift * f, phase + step * f, visible, fmt)
                for f in range(length)]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _savemat(path: Path, key: str, value: np.ndarray) -> None:
    """A MATLAB 5 file whose 116-byte text header carries no date, so output is reproducible."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, {key: value})
    data = buf.getvalue()
    header = b"MATLAB 5.0 MAT-file, written by fastnl synth".ljust(116, b" ")
    path.write_bytes(header + data[116:])


def _plan_ids(rng, ids: int, cams: int, num_pids: int):
    """Sorted distinct pids and, per pid, its cameras (at least two) and tracklets per camera."""
    pids = np.sort(rng.choice(np.arange(1, 10 * num_pids + 2), size=num_pids, replace=False))
    plan = {}
    for pid in pids:
        chosen = np.sort(rng.choice(np.arange(1, cams + 1), size=int(rng.integers(2, cams + 1)),
                                    replace=False))
        plan[int(pid)] = [(int(c), int(rng.integers(1, 3))) for c in chosen]
    return plan


def write_dataset(out, *, fmt: str = "mars", ids: int = 40, cams: int | None = None,
                  seed: int = 0, size: tuple[int, int] = (128, 64), min_frames: int | None = None,
                  max_frames: int | None = None, quality: int = 90) -> Path:
    """Write a synthetic dataset under ``out`` in the ``fmt`` layout and return its path.

    ``ids`` identities (half train, half test; for iLIDS-VID and PRID-2011 the persons seen by
    both cameras, split by the split table), ``cams`` cameras (default 4; 2 for the two-camera
    sets), frames of ``size`` (h, w), tracklets of ``min_frames`` to ``max_frames`` frames
    (default 4..16; 20..40 for PRID-2011); fully determined by ``seed``.
    If ``out`` already holds a dataset written with the same arguments it is kept as is; any
    other non-empty ``out`` is refused.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown synthetic format {fmt!r}: choose one of {', '.join(FORMATS)}")
    cams = DEFAULT_CAMS[fmt] if cams is None else cams
    lo, hi = DEFAULT_FRAMES[fmt]
    min_frames = lo if min_frames is None else min_frames
    max_frames = max(hi, min_frames) if max_frames is None else max_frames
    if ids < 4:
        raise UserError(f"--ids must be at least 4 (2 train and 2 test ids), got {ids}")
    if ids > MAX_IDS.get(fmt, ids):
        raise UserError(f"--ids must be at most {MAX_IDS[fmt]} for {fmt}, got {ids}")
    if MAX_CAMS[fmt] == 2 and cams != 2:
        raise UserError(f"{fmt} has exactly 2 cameras: --cams must be 2, got {cams}")
    if not 2 <= cams <= MAX_CAMS[fmt]:
        raise UserError(f"--cams must lie in 2..{MAX_CAMS[fmt]} for {fmt}, got {cams}")
    if not 1 <= min_frames <= max_frames <= 999:
        raise UserError(f"frames per tracklet must satisfy 1 <= min ({min_frames}) <= max "
                        f"({max_frames}) <= 999")
    h, w = size
    if h < 16 or w < 8:
        raise UserError(f"frame size {h}x{w} too small (at least 16x8)")
    out = Path(out)
    params = {"format": fmt, "ids": ids, "cams": cams, "seed": seed, "size": [h, w],
              "min_frames": min_frames, "max_frames": max_frames, "quality": quality}
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        marker = out / MARKER
        if marker.is_file():
            try:
                same = json.loads(marker.read_text()) == params
            except ValueError:
                same = False
            if same:
                return out
        if any(out.iterdir()):
            raise UserError(f"output folder {out} is not empty: choose a new folder or empty it")
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    render = _Renderer(h, w, quality)
    if fmt in ("ilidsvid", "prid2011"):
        _write_two_camera(out, rng, render, fmt, ids, min_frames, max_frames)
        (out / MARKER).write_text(json.dumps(params, indent=1) + "\n")
        return out
    hues = (np.arange(ids * 2) * 0.6180339887 + rng.random()) % 1.0
    cameras = {c: _camera(rng, h, w) for c in range(1, MAX_CAMS[fmt] + 1)}
    extra = max(2, (ids - ids // 2) // 4)
    plan = _plan_ids(rng, ids, cams, ids + (extra if fmt == "dukevideo" else 0))
    pids = list(plan)
    order = rng.permutation(len(pids))
    looks = {pid: _look(rng, hues[i]) for i, pid in enumerate(pids)}
    train_pids = sorted(pids[i] for i in order[:ids // 2])
    test_pids = sorted(pids[i] for i in order[ids // 2:ids])
    distractor_pids = sorted(pids[i] for i in order[ids:])
    lengths = lambda: int(rng.integers(min_frames, max_frames + 1))  # noqa: E731

    if fmt == "mars":
        _write_mars(out, rng, render, plan, looks, cameras, train_pids, test_pids, extra, cams,
                    lengths)
    else:
        _write_duke(out, rng, render, plan, looks, cameras, train_pids, test_pids,
                    distractor_pids, lengths)
    (out / MARKER).write_text(json.dumps(params, indent=1) + "\n")
    return out


def _write_mars(out, rng, render, plan, looks, cameras, train_pids, test_pids, extra, cams,
                lengths):
    def tracks(pid_list, junk_tracks):
        rows = []  # (pid, cam, tracklet number, frames, is_query)
        for pid in pid_list:
            query_cam = plan[pid][int(rng.integers(len(plan[pid])))][0]
            for cam, count in plan[pid]:
                for t in range(1, count + 1):
                    frames = render.tracklet(rng, looks[pid], cameras[cam], lengths())
                    rows.append((pid, cam, t, frames, cam == query_cam and t == 1))
        rows += junk_tracks
        return rows

    junk = []
    for pid, count in ((0, extra), (-1, max(2, extra // 2))):
        per_cam: dict[int, int] = {}
        for _ in range(count):
            cam = int(rng.integers(1, cams + 1))
            per_cam[cam] = per_cam.get(cam, 0) + 1
            look = _look(rng, rng.random()) if pid == 0 else looks[test_pids[0]]
            frames = render.tracklet(rng, look if pid == 0 or rng.random() < 0.5 else None,
                                     cameras[cam], lengths(), junk=pid == -1)
            junk.append((pid, cam, per_cam[cam], frames, False))

    for split, pid_list, junk_tracks in (("train", train_pids, []), ("test", test_pids, junk)):
        rows = sorted(tracks(pid_list, junk_tracks),
                      key=lambda r: (str(r[0]).rjust(4, "0"), r[1], r[2]))
        names, info, query = [], [], []
        for row, (pid, cam, t, frames, is_query) in enumerate(rows, start=1):
            prefix = str(pid).rjust(4, "0")
            start = len(names) + 1
            for f, data in enumerate(frames, start=1):
                name = f"{prefix}C{cam}T{t:04d}F{f:03d}.jpg"
                _write(out / f"bbox_{split}" / prefix / name, data)
                names.append(name)
            info.append((start, len(names), pid, cam))
            if is_query:
                query.append(row)
        info_dir = out / "info"
        info_dir.mkdir(exist_ok=True)
        (info_dir / f"{split}_name.txt").write_text("\n".join(names) + "\n")
        # Integers, as in the official release (int32): torchreid slices and indexes with them.
        _savemat(info_dir / f"tracks_{split}_info.mat", f"track_{split}_info",
                 np.array(info, dtype=np.int32))
        if split == "test":
            _savemat(info_dir / "query_IDX.mat", "query_IDX", np.array([query], dtype=np.int32))


def _write_duke(out, rng, render, plan, looks, cameras, train_pids, test_pids, distractor_pids,
                lengths):
    counter = 0

    def write_tracklet(split, pid, number, cam):
        nonlocal counter
        first = 2 if rng.random() < 0.1 else 1
        for f, data in enumerate(render.tracklet(rng, looks[pid], cameras[cam], lengths()),
                                 start=first):
            counter += 1
            _write(out / split / f"{pid:04d}" / f"{number:04d}" /
                   f"{pid:04d}_C{cam}_F{f:04d}_X{counter:05d}.jpg", data)

    for pid in train_pids:
        number = 0
        for cam, count in plan[pid]:
            for _ in range(count):
                number += 1
                write_tracklet("train", pid, number, cam)
    for pid in test_pids + distractor_pids:
        number = 0
        query_at = int(rng.integers(len(plan[pid])))
        for i, (cam, count) in enumerate(plan[pid]):
            for t in range(count):
                number += 1
                is_query = pid in test_pids and i == query_at and t == 0
                write_tracklet("query" if is_query else "gallery", pid, number, cam)
    for split in ("train", "query", "gallery"):
        os.makedirs(out / split, exist_ok=True)


def _write_two_camera(out, rng, render, fmt, ids, min_frames, max_frames):
    """iLIDS-VID or PRID-2011 layout: one PNG sequence per person and camera."""
    cameras = [_camera(rng, render.h, render.w) for _ in range(2)]
    hues = (np.arange(ids * 2) * 0.6180339887 + rng.random()) % 1.0
    length = lambda: int(rng.integers(min_frames, max_frames + 1))  # noqa: E731

    def sequence(folder: Path, look, cam, name):
        for f, data in enumerate(render.tracklet(rng, look, cameras[cam], length(), fmt="PNG")):
            _write(folder / name(f), data)

    if fmt == "ilidsvid":
        # Person numbers with gaps (the release numbers its 300 persons up to 319).
        numbers = np.sort(rng.choice(np.arange(1, ids + ids // 15 + 2), size=ids, replace=False))
        seq = out / "i-LIDS-VID" / "sequences"
        for i, num in enumerate(numbers):
            look = _look(rng, hues[i])
            for cam in (0, 1):
                start = int(rng.integers(1, 900))
                sequence(seq / f"cam{cam + 1}" / f"person{num:03d}", look, cam,
                         lambda f, c=cam, n=num, s=start: f"cam{c + 1}_person{n:03d}_{s + f:05d}.png")
        table = np.stack([rng.permutation(ids) + 1 for _ in range(NUM_SPLITS)]).astype(np.float64)
        splits_dir = out / "train-test people splits"
        splits_dir.mkdir(parents=True)
        _savemat(splits_dir / "train_test_splits_ilidsvid.mat", "ls_set", table)
    else:
        base = out / "prid_2011" / "multi_shot"
        only = {"cam_a": max(2, ids // 4), "cam_b": max(3, ids // 2)}
        for i in range(ids):
            look = _look(rng, hues[i])
            for cam, cam_name in enumerate(("cam_a", "cam_b")):
                sequence(base / cam_name / f"person_{i + 1:04d}", look, cam,
                         lambda f: f"{f + 1:04d}.png")
        for cam, cam_name in enumerate(("cam_a", "cam_b")):  # persons seen by one camera only
            for j in range(only[cam_name]):
                sequence(base / cam_name / f"person_{201 + j:04d}", _look(rng, rng.random()), cam,
                         lambda f: f"{f + 1:04d}.png")
