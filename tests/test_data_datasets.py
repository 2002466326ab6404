"""Readers of MARS and DukeMTMC-VideoReID on hand-made trees with known counts and on the
synthetic datasets; every bad-input case raises a DatasetError naming the path."""
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fastnl.cli import main as cli_main
from fastnl.data.datasets import (DATASETS, DatasetError, DukeVideo, MARS, detect_format,
                                  get_dataset)
from fastnl.data.synthetic import write_dataset
from fastnl.errors import UserError


def _jpeg(seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()

# (pid, cam, frames)
MARS_TRAIN = [(2, 1, 3), (2, 3, 2), (7, 2, 4), (9, 1, 1), (9, 6, 2)]
MARS_TEST = [(-1, 2, 2), (0, 1, 3), (3, 1, 2), (3, 2, 5), (3, 4, 1), (5, 2, 2), (5, 5, 3),
             (-1, 5, 1)]
MARS_QUERY = [3, 6]  # 1-based rows of MARS_TEST: (3, cam 1) and (5, cam 2)


def make_mars(root: Path, train=MARS_TRAIN, test=MARS_TEST, query=MARS_QUERY) -> Path:
    info = root / "info"
    info.mkdir(parents=True)
    for split, tracks in (("train", train), ("test", test)):
        names, rows, count = [], [], {}
        for pid, cam, frames in tracks:
            prefix = str(pid).rjust(4, "0")
            t = count[(pid, cam)] = count.get((pid, cam), 0) + 1
            start = len(names) + 1
            for f in range(1, frames + 1):
                name = f"{prefix}C{cam}T{t:04d}F{f:03d}.jpg"
                (root / f"bbox_{split}" / prefix).mkdir(parents=True, exist_ok=True)
                (root / f"bbox_{split}" / prefix / name).write_bytes(JPEG)
                names.append(name)
            rows.append((start, len(names), pid, cam))
        (info / f"{split}_name.txt").write_text("\n".join(names) + "\n")
        scipy.io.savemat(str(info / f"tracks_{split}_info.mat"),
                         {f"track_{split}_info": np.array(rows, dtype=np.float64)})
    scipy.io.savemat(str(info / "query_IDX.mat"), {"query_IDX": np.array([query], float)})
    return root


def read_mars(root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = MARS(root)
    return data, [str(w.message) for w in caught]


def test_mars_counts_split_relabel_and_junk(tmp_path):
    data, warned = read_mars(make_mars(tmp_path))
    assert [(len(p), pid, cam) for p, pid, cam in data.train] == [
        (3, 0, 0), (2, 0, 2), (4, 1, 1), (1, 2, 0), (2, 2, 5)]
    assert data.num_train_pids == 3
    assert [(len(p), pid, cam) for p, pid, cam in data.query] == [(2, 3, 0), (2, 5, 1)]
    # pid 0 distractors stay in the gallery; both pid -1 junk tracklets are gone.
    assert [(len(p), pid, cam) for p, pid, cam in data.gallery] == [
        (3, 0, 0), (5, 3, 1), (1, 3, 3), (3, 5, 4)]
    assert data.train[1][0] == (str(tmp_path / "bbox_train/0002/0002C3T0001F001.jpg"),
                                str(tmp_path / "bbox_train/0002/0002C3T0001F002.jpg"))
    assert data.notes == ["ignored 2 junk tracklets (pid -1: 0 query, 2 gallery), as the "
                          "official MARS evaluation does"]
    assert len(warned) == 1 and "2 junk tracklets" in warned[0]
    table = data.summary().splitlines()
    assert table[3].split("|") == ["  train    ", "      3 ", "           5 ", "        12 ",
                                   "         4"]
    assert [int(x) for x in table[4].split("|")[1:]] == [2, 2, 4, 2]
    assert [int(x) for x in table[5].split("|")[1:]] == [3, 4, 12, 4]


def test_mars_verify_passes_on_good_frames(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(MARS(make_mars(tmp_path), verify=True).train) == 5


def _rewrite_mat(path: Path, key: str, value):
    scipy.io.savemat(str(path), {key: value})


def _bad_mars(case: str, root: Path) -> str:
    """Break a good tree; return the text the error must contain."""
    info = root / "info"
    if case == "no root":
        return str(root / "nothing")
    if case == "no names file":
        (info / "test_name.txt").unlink()
        return str(info / "test_name.txt")
    if case == "no frame folder":
        os.rename(root / "bbox_train", root / "bbox_train.old")
        return str(root / "bbox_train")
    if case == "mat wrong shape":
        _rewrite_mat(info / "tracks_train_info.mat", "track_train_info", np.ones((5, 3)))
        return "has shape (5, 3), expected [num_tracks, 4]"
    if case == "mat wrong key":
        _rewrite_mat(info / "tracks_test_info.mat", "tracks", np.ones((8, 4)))
        return "has no variable 'track_test_info' (found: tracks)"
    if case == "mat not a mat":
        (info / "query_IDX.mat").write_bytes(b"not a MATLAB file")
        return f"cannot read MATLAB file {info / 'query_IDX.mat'}"
    if case == "query out of range":
        _rewrite_mat(info / "query_IDX.mat", "query_IDX", np.array([[3, 9]], float))
        return "'query_IDX' values must lie in 1..8"
    if case == "query 2-d":
        _rewrite_mat(info / "query_IDX.mat", "query_IDX", np.ones((2, 2)))
        return "'query_IDX' has shape (2, 2)"
    if case == "frame absent":
        gone = root / "bbox_test/0005/0005C5T0001F002.jpg"
        gone.unlink()
        return f"frame listed in {info / 'test_name.txt'} but absent: {gone}"
    if case == "empty tracklet":
        rows = scipy.io.loadmat(str(info / "tracks_train_info.mat"))["track_train_info"]
        rows[2, 1] = rows[2, 0] - 1
        _rewrite_mat(info / "tracks_train_info.mat", "track_train_info", rows)
        return "row 3 is an empty tracklet (start 6 > end 5)"
    if case == "wrong pid in names":
        rows = scipy.io.loadmat(str(info / "tracks_train_info.mat"))["track_train_info"]
        rows[2, 2] = 8
        _rewrite_mat(info / "tracks_train_info.mat", "track_train_info", rows)
        return "frame 0007C2T0001F001.jpg listed in a track of pid 8, camera 2"
    if case == "camera out of range":
        rows = scipy.io.loadmat(str(info / "tracks_train_info.mat"))["track_train_info"]
        rows[0, 3] = 7
        _rewrite_mat(info / "tracks_train_info.mat", "track_train_info", rows)
        return "row 1 camera 7 not in 1..6"
    raise AssertionError(case)


MARS_CASES = ["no root", "no names file", "no frame folder", "mat wrong shape", "mat wrong key",
              "mat not a mat", "query out of range", "query 2-d", "frame absent",
              "empty tracklet", "wrong pid in names", "camera out of range"]


@pytest.mark.parametrize("case", MARS_CASES)
def test_mars_bad_input(tmp_path, case):
    root = make_mars(tmp_path / "mars")
    expected = _bad_mars(case, root)
    target = root / "nothing" if case == "no root" else root
    with pytest.raises(DatasetError) as err:
        read_mars(target)
    assert expected in str(err.value)
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_mars_verify_finds_unreadable_jpeg(tmp_path, damage):
    root = make_mars(tmp_path)
    bad = root / "bbox_test/0003/0003C2T0001F004.jpg"
    bad.write_bytes(JPEG[: len(JPEG) // 2] if damage == "truncated" else b"garbage")
    assert len(read_mars(root)[0].gallery) == 4  # only verify decodes frames
    with pytest.raises(DatasetError, match=f"unreadable frame: {bad}: "):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MARS(root, verify=True)


def _garbled_jpegs(count: int) -> list[bytes]:
    """Frames with 200 random bytes written over the middle of their entropy-coded data that
    Pillow still decodes (no error, no warning) into visibly damaged images."""
    import random

    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:128, 0:64]
    smooth = np.stack([y * 2, x * 4, (x + y) % 256], axis=-1).astype(np.uint8)  # a frame-like image
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + rng.integers(0, 20, smooth.shape), 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=90)
    clean = buf.getvalue()
    sos = clean.index(b"\xff\xda")
    found = []
    for seed in range(200):
        r = random.Random(seed)
        data = bytearray(clean)
        start = r.randrange(sos + 20, len(data) - 220)
        data[start:start + 200] = bytes(r.randrange(256) for _ in range(200))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with Image.open(io.BytesIO(bytes(data))) as img:
                    decoded = np.array(img.convert("RGB"))
            except OSError:
                continue  # this garbling Pillow does report
        assert not caught
        if np.abs(decoded.astype(int) - np.array(Image.open(io.BytesIO(clean)).convert("RGB"), int)).max() > 50:
            found.append(bytes(data))
        if len(found) == count:
            return found
    raise AssertionError("no silently garbled frame found")


def test_verify_finds_garbled_frames_pillow_decodes_silently(tmp_path):
    from fastnl.data.datasets.base import check_jpeg

    root = make_mars(tmp_path / "mars")
    frames = sorted(Path(p) for paths, _, _ in read_mars(root)[0].gallery for p in paths)
    garbled = _garbled_jpegs(3)
    for frame, data in zip(frames[:3], garbled):
        frame.write_bytes(data)
    assert check_jpeg(str(frames[3])) is None  # clean frames pass
    png = tmp_path / "png.jpg"  # a PNG named .jpg decodes (Pillow reads it), libjpeg is not run on it
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(png, "PNG")
    assert check_jpeg(str(png)) is None
    assert check_jpeg(str(frames[0])).startswith("Corrupt JPEG data: ")
    with pytest.raises(DatasetError, match=f"unreadable frame: {frames[0]}: Corrupt JPEG data: .*"
                                           r"\(2 more bad frames\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MARS(root, verify=True)


def test_loader_warns_about_a_garbled_frame_naming_it(tmp_path):
    from fastnl.data.transforms import decode_frame

    path = tmp_path / "frame.jpg"
    path.write_bytes(_garbled_jpegs(1)[0])
    with pytest.warns(UserWarning, match=f"corrupt frame {path}: Corrupt JPEG data"):
        assert decode_frame(str(path)).shape == (3, 128, 64)


@pytest.mark.parametrize("fmt", ["mars", "dukevideo"])
def test_a_fifo_named_jpg_is_refused_not_waited_on(tmp_path, fmt):
    from fastnl.data.datasets.base import read_bytes, verify_frames

    root = make_mars(tmp_path / "d") if fmt == "mars" else make_duke(tmp_path / "d")
    frame = sorted(root.rglob("*.jpg"))[-1]
    frame.unlink()
    os.mkfifo(frame)
    reader = MARS if fmt == "mars" else DukeVideo
    with pytest.raises(DatasetError, match=f"not a regular file.*{frame}|{frame} is not a regular file"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader(root)
    # read at load time or by --verify (e.g. a FIFO created after the dataset was read)
    with pytest.raises(DatasetError, match=f"frame {frame}: it is a FIFO, not a regular file"):
        read_bytes(str(frame))
    with pytest.raises(DatasetError, match=f"unreadable frame: {frame}: it is a FIFO"):
        verify_frames([str(frame)])


# pid -> list of tracklets; a tracklet is (cam, [frame numbers])
DUKE = {
    "train": {12: [(1, [1, 2, 3]), (4, [2, 3])], 40: [(2, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])],
              7: [(8, [1])]},
    "query": {3: [(1, [1, 2])], 5: [(2, [1])]},
    "gallery": {3: [(2, [1, 2, 3]), (3, [1])], 5: [(5, [1, 2])], 900: [(6, [1, 2, 3, 4])]},
}


def make_duke(root: Path, layout=DUKE) -> Path:
    x = 0
    for split, pids in layout.items():
        (root / split).mkdir(parents=True)
        for pid, tracks in pids.items():
            for t, (cam, frames) in enumerate(tracks, start=1):
                tdir = root / split / f"{pid:04d}" / f"{t:04d}"
                tdir.mkdir(parents=True)
                for f in reversed(frames):
                    x += 1
                    (tdir / f"{pid:04d}_C{cam}_F{f:04d}_X{x:05d}.jpg").write_bytes(JPEG)
    return root


def test_duke_counts_order_and_relabel(tmp_path):
    root = make_duke(tmp_path)
    (root / "train/0040/0001/Thumbs.db").write_bytes(b"x")
    with pytest.warns(UserWarning, match="ignored 1 files that are not .jpg"):
        data = DukeVideo(root)
    assert [(len(p), pid, cam) for p, pid, cam in data.train] == [
        (1, 0, 7), (3, 1, 0), (2, 1, 3), (10, 2, 1)]
    assert data.num_train_pids == 3
    assert [(len(p), pid, cam) for p, pid, cam in data.query] == [(2, 3, 0), (1, 5, 1)]
    assert [(len(p), pid, cam) for p, pid, cam in data.gallery] == [
        (3, 3, 1), (1, 3, 2), (2, 5, 4), (4, 900, 5)]
    names = [os.path.basename(p) for p in data.train[3][0]]
    assert [n[8:13] for n in names] == [f"F{f:04d}" for f in range(1, 11)]
    assert os.path.basename(data.train[2][0][0]).startswith("0012_C4_F0002")


def _bad_duke(case: str, root: Path) -> str:
    if case == "no split folder":
        os.rename(root / "gallery", root / "gallery.old")
        return f"DukeMTMC-VideoReID gallery folder not found: {root / 'gallery'}"
    if case == "empty tracklet":
        (root / "query/0003/0002").mkdir()
        return f"empty tracklet: {root / 'query/0003/0002'} holds no .jpg frames"
    if case == "mixed cameras":
        (root / "train/0012/0001/0012_C2_F0009_X99999.jpg").write_bytes(JPEG)
        return f"tracklet {root / 'train/0012/0001'} mixes cameras [1, 2]"
    if case == "bad frame name":
        (root / "train/0012/0001/frame.jpg").write_bytes(JPEG)
        return f"frame name not understood: {root / 'train/0012/0001/frame.jpg'}"
    if case == "pid mismatch":
        (root / "train/0012/0001/0013_C1_F0009_X99999.jpg").write_bytes(JPEG)
        return "names pid 0013 inside the folder of pid 12"
    if case == "non-numeric id folder":
        (root / "train/misc").mkdir()
        return f"unexpected folder {root / 'train/misc'}"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no split folder", "empty tracklet", "mixed cameras",
                                  "bad frame name", "pid mismatch", "non-numeric id folder"])
def test_duke_bad_input(tmp_path, case):
    root = make_duke(tmp_path)
    expected = _bad_duke(case, root)
    with pytest.raises(DatasetError) as err:
        DukeVideo(root)
    assert expected in str(err.value)


def test_duke_missing_root_and_verify(tmp_path):
    with pytest.raises(DatasetError, match=f"DukeMTMC-VideoReID root not found: {tmp_path / 'x'}"):
        DukeVideo(tmp_path / "x")
    root = make_duke(tmp_path / "duke")
    bad = root / "gallery/0900/0001/0900_C6_F0003_X00011.jpg"
    bad.write_bytes(JPEG[:100])
    assert len(DukeVideo(root).gallery) == 4
    with pytest.raises(DatasetError, match=f"unreadable frame: {bad}: (?i:.*truncated)"):
        DukeVideo(root, verify=True)


def test_registry(tmp_path):
    assert DATASETS == ("mars", "dukevideo", "ilidsvid", "prid2011", "synthetic")
    mars = make_mars(tmp_path / "m")
    duke = make_duke(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(get_dataset("mars", mars), MARS)
        assert isinstance(get_dataset("synthetic", mars), MARS)
    assert isinstance(get_dataset("dukevideo", duke), DukeVideo)
    assert isinstance(get_dataset("synthetic", duke), DukeVideo)
    with pytest.raises(DatasetError, match="unknown dataset 'market'"):
        get_dataset("market", mars)
    (tmp_path / "e").mkdir()
    with pytest.raises(DatasetError, match="is not a MARS folder"):
        detect_format(tmp_path / "e")
    with pytest.raises(DatasetError, match="dataset folder not found"):
        get_dataset("synthetic", tmp_path / "none")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {fmt: write_dataset(root / fmt, fmt=fmt, ids=12, cams=3, seed=3, size=(32, 16),
                               min_frames=2, max_frames=6)
            for fmt in ("mars", "dukevideo")}


def _files(root: Path, folder: str) -> set:
    return {str(p) for p in (root / folder).rglob("*.jpg")}


def test_synthetic_mars_is_consistent(synth):
    root = synth["mars"]
    assert json.loads((root / "synth.json").read_text())["format"] == "mars"
    data, _ = read_mars(root)
    splits = (data.train, data.query, data.gallery)
    used = [p for split in splits for t in split for p in t[0]]
    junk = _files(root, "bbox_test/00-1")
    assert len(used) == len(set(used))
    assert set(used) | junk == _files(root, "bbox_train") | _files(root, "bbox_test")
    junk_tracklets = {os.path.basename(p)[:11] for p in junk}
    assert data.notes == [f"ignored {len(junk_tracklets)} junk tracklets (pid -1: 0 query, "
                          f"{len(junk_tracklets)} gallery), as the official MARS evaluation does"]
    assert len(junk_tracklets) >= 2
    assert data.num_train_pids == 6 and {t[1] for t in data.train} == set(range(6))
    query_ids = {t[1] for t in data.query}
    assert len(query_ids) == 6 == len(data.query)
    assert {t[1] for t in data.gallery} == query_ids | {0}
    for _, pid, cam in data.query:
        assert any(g[1] == pid and g[2] != cam for g in data.gallery)
    assert len(data.train[0][0]) >= 2 and all(2 <= len(t[0]) <= 6 for s in splits for t in s)


def test_synthetic_duke_is_consistent(synth):
    root = synth["dukevideo"]
    data = DukeVideo(root)
    used = [p for split in (data.train, data.query, data.gallery) for t in split for p in t[0]]
    assert sorted(used) == sorted(_files(root, "train") | _files(root, "query")
                                  | _files(root, "gallery"))
    query_ids = {t[1] for t in data.query}
    gallery_ids = {t[1] for t in data.gallery}
    assert data.num_train_pids == 6 and len(query_ids) == 6 == len(data.query)
    assert query_ids < gallery_ids and len(gallery_ids - query_ids) == 2  # distractor ids
    for _, pid, cam in data.query:
        assert any(g[1] == pid and g[2] != cam for g in data.gallery)


def test_synthetic_is_deterministic_and_refuses_other_folders(tmp_path):
    def digest(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    a = write_dataset(tmp_path / "a", fmt="mars", ids=4, cams=2, seed=5, size=(16, 8))
    b = write_dataset(tmp_path / "b", fmt="mars", ids=4, cams=2, seed=5, size=(16, 8))
    c = write_dataset(tmp_path / "c", fmt="mars", ids=4, cams=2, seed=6, size=(16, 8))
    assert digest(a) == digest(b) != digest(c)
    assert write_dataset(a, fmt="mars", ids=4, cams=2, seed=5, size=(16, 8)) == a
    with pytest.raises(UserError, match=f"output folder {a} is not empty"):
        write_dataset(a, fmt="mars", ids=4, cams=2, seed=7, size=(16, 8))
    with pytest.raises(UserError, match="--cams must lie in 2..6 for mars"):
        write_dataset(tmp_path / "d", fmt="mars", cams=7)
    with pytest.raises(UserError, match="--ids must be at least 4"):
        write_dataset(tmp_path / "d", fmt="dukevideo", ids=3)


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "duke"
    assert cli_main(["synth", "--format", "dukevideo", "--out", str(out), "--ids", "6",
                     "--cams", "3", "--height", "32", "--width", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"dukevideo ({out})") and f"wrote {out} in" in printed
    assert cli_main(["synth", "--out", str(tmp_path / "m"), "--cams", "9"]) == 2
    assert capsys.readouterr().err == ("fastnl synth: error: --cams must lie in 2..6 for mars, "
                                       "got 9\n")


def test_synthetic_mars_tables_are_integers_like_the_release(tmp_path):
    root = write_dataset(tmp_path / "m", fmt="mars", ids=4, cams=2, seed=0, size=(16, 8))
    for name, key in (("tracks_train_info", "track_train_info"),
                      ("tracks_test_info", "track_test_info"), ("query_IDX", "query_IDX")):
        table = scipy.io.loadmat(str(root / "info" / f"{name}.mat"))[key]
        assert table.dtype == np.int32, name  # float tables break readers that index with them
