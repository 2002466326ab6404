"""iLIDS-VID and PRID-2011 readers on hand-made trees with known counts, the synthetic trees
in those layouts, and the errors naming the path. (The same readers were compared with
torchreid's on synthetic trees: same tracklets, ids and splits.)"""
import io
import json
import warnings

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fastnl.data.datasets import ILIDSVID, PRID2011, DatasetError, detect_format, get_dataset
from fastnl.data.datasets.prid2011 import make_splits
from fastnl.data.synthetic import write_dataset


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()

# iLIDS-VID: person number -> (cam1 frames, cam2 frames)
ILIDS = {1: (3, 2), 3: (1, 4), 4: (2, 2), 10: (5, 1)}
# rows of 1-based indices into the sorted folders (person001, person003, person004, person010)
LS_SET = [[2, 4, 1, 3], [1, 2, 3, 4]]


def make_ilids(root, persons=ILIDS, ls_set=LS_SET):
    for num, counts in persons.items():
        for cam, n in zip((1, 2), counts):
            folder = root / "i-LIDS-VID" / "sequences" / f"cam{cam}" / f"person{num:03d}"
            folder.mkdir(parents=True)
            for f in range(n):
                (folder / f"cam{cam}_person{num:03d}_{100 - 10 * f:05d}.png").write_bytes(PNG)
    splits = root / "train-test people splits"
    splits.mkdir()
    scipy.io.savemat(str(splits / "train_test_splits_ilidsvid.mat"),
                     {"ls_set": np.array(ls_set, dtype=np.float64)})
    return root


def test_ilidsvid_splits_counts_and_pids(tmp_path):
    root = make_ilids(tmp_path)
    d = ILIDSVID(root)  # split 0: test = rows[0][:2] = person003, person010
    assert d.num_splits == 2 and d.split_id == 0
    assert d.splits[0] == {"train": ["person001", "person004"], "test": ["person003", "person010"]}
    assert [(len(p), pid, cam) for p, pid, cam in d.train] == [(3, 0, 0), (2, 0, 1), (2, 1, 0),
                                                              (2, 1, 1)]
    assert [(len(p), pid, cam) for p, pid, cam in d.query] == [(1, 3, 0), (5, 10, 0)]
    assert [(len(p), pid, cam) for p, pid, cam in d.gallery] == [(4, 3, 1), (1, 10, 1)]
    assert d.num_train_pids == 2
    frames = d.train[0][0]
    assert frames == tuple(sorted(frames)) and frames[0].endswith("cam1_person001_00080.png")
    d1 = get_dataset("ilidsvid", root, split_id=1)
    assert [t[1] for t in d1.query] == [1, 3] and len(d1.train) == 4
    assert detect_format(root) == "ilidsvid"


@pytest.mark.parametrize("case, message", [
    ("no_mat", "iLIDS-VID splits file not found: .*train_test_splits_ilidsvid.mat"),
    ("split_id", r"split id 2 out of range: .* holds 2 splits \(0..1\)"),
    ("not_perm", r"row 2 of 'ls_set' is not a permutation of 1..4"),
    ("shape", r"'ls_set' has shape \(2, 3\), expected \[num_splits, 4\]"),
    ("one_cam", "cam1 and cam2 must hold the same persons; 1 are in one camera only, e.g. person010"),
    ("empty", "empty tracklet: .*cam2/person004 holds no .png frames"),
    ("no_seq", "iLIDS-VID sequences folder not found"),
])
def test_ilidsvid_bad_input(tmp_path, case, message):
    root = make_ilids(tmp_path, ls_set={"not_perm": [[1, 2, 3, 4], [1, 1, 3, 4]],
                                         "shape": [[1, 2, 3], [3, 2, 1]]}.get(case, LS_SET))
    split_id = 0
    if case == "no_mat":
        (root / "train-test people splits" / "train_test_splits_ilidsvid.mat").unlink()
    elif case == "split_id":
        split_id = 2
    elif case == "one_cam":
        for f in (root / "i-LIDS-VID/sequences/cam2/person010").iterdir():
            f.unlink()
        (root / "i-LIDS-VID/sequences/cam2/person010").rmdir()
    elif case == "empty":
        for f in (root / "i-LIDS-VID/sequences/cam2/person004").iterdir():
            f.unlink()
        split_id = 1
    elif case == "no_seq":
        root = tmp_path / "elsewhere"
        root.mkdir()
    with pytest.raises(DatasetError, match=message):
        ILIDSVID(root, split_id=split_id)


# PRID-2011: person number -> (cam_a frames, cam_b frames); None = absent from that camera.
PRID = {1: (27, 30), 2: (26, 40), 3: (30, 27), 4: (27, 27), 5: (50, 10), 6: (28, None),
        7: (28, 29), 201: (30, 30), 202: (None, 30)}
PRID_KEPT = ["person_0001", "person_0003", "person_0004", "person_0007"]


def make_prid(root, persons=PRID):
    for num, counts in persons.items():
        for cam, n in zip(("cam_a", "cam_b"), counts):
            if n is None:
                continue
            folder = root / "prid_2011" / "multi_shot" / cam / f"person_{num:04d}"
            folder.mkdir(parents=True)
            for f in range(1, n + 1):
                (folder / f"{f:04d}.png").write_bytes(PNG)
    return root


def read_prid(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PRID2011(*args, **kwargs)


def test_prid2011_protocol_and_seeded_splits(tmp_path):
    root = make_prid(tmp_path)
    d = read_prid(root)
    # persons 1..200 seen by both cameras with >= 27 frames in each: 1, 3, 4, 7
    assert d.notes == ["kept 4 of the 6 persons seen by both cameras (those with at least 27 "
                       "frames in each; 178 on the release)"]
    assert d.num_splits == 10 and d.splits == make_splits(PRID_KEPT, 10, 0)
    for split in d.splits:
        assert len(split["test"]) == len(split["train"]) == 2
        assert sorted(split["train"] + split["test"]) == PRID_KEPT
    assert len({tuple(s["test"]) for s in d.splits}) > 1  # the splits differ
    test = [int(n[-4:]) for n in d.splits[0]["test"]]
    assert [t[1:] for t in d.query] == [(p, 0) for p in test]
    assert [t[1:] for t in d.gallery] == [(p, 1) for p in test]
    assert [(pid, cam) for _, pid, cam in d.train] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    counts = {n: PRID[int(n[-4:])] for n in PRID_KEPT}
    assert [len(t[0]) for t in d.query] == [counts[n][0] for n in d.splits[0]["test"]]
    assert [len(t[0]) for t in d.gallery] == [counts[n][1] for n in d.splits[0]["test"]]
    assert read_prid(root, split_id=3).splits == d.splits  # deterministic
    assert read_prid(root, seed=1).splits != d.splits
    split = read_prid(root, min_frames=10).splits[0]
    assert sorted(split["train"] + split["test"]) == [f"person_{n:04d}" for n in (1, 2, 3, 4, 5, 7)]
    assert detect_format(root) == "prid2011"
    assert read_prid(root / "prid_2011").splits == d.splits  # root may be prid_2011 itself


def test_prid2011_reads_torchreid_splits(tmp_path):
    root = make_prid(tmp_path)
    splits = [{"train": ["person_0002", "person_0005"], "test": ["person_0001", "person_0007"]}]
    (root / "splits_prid2011.json").write_text(json.dumps(splits))
    d = read_prid(root)  # the file fixes the ids: the frame rule is not applied to it
    assert d.num_splits == 1 and d.splits == splits and d.notes == []
    assert [(len(p), pid, cam) for p, pid, cam in d.query] == [(27, 1, 0), (28, 7, 0)]
    assert [(len(p), pid, cam) for p, pid, cam in d.train] == [(26, 0, 0), (40, 0, 1), (50, 1, 0),
                                                              (10, 1, 1)]
    with pytest.raises(DatasetError, match=r"split id 1 out of range: .*splits_prid2011.json "
                                           r"holds 1 splits \(0..0\)"):
        read_prid(root, split_id=1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"train": ["person_0006"], "test": ["person_0001"]}]))
    with pytest.raises(DatasetError, match="split 0 train names 'person_0006', which is not a "
                                           "person folder of both cameras"):
        read_prid(root, splits=bad)
    with pytest.raises(DatasetError, match="PRID-2011 splits file not found: .*none.json"):
        read_prid(root, splits=tmp_path / "none.json")
    with pytest.raises(DatasetError, match="PRID-2011 multi-shot folder not found"):
        read_prid(tmp_path / "prid_2011" / "multi_shot" / "cam_a")
    with pytest.raises(DatasetError, match="mars has one fixed train/test split"):
        get_dataset("mars", root, split_id=1)


@pytest.mark.parametrize("fmt", ["ilidsvid", "prid2011"])
def test_synthetic_two_camera_trees(tmp_path, fmt):
    root = write_dataset(tmp_path / fmt, fmt=fmt, ids=8, seed=1, size=(16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = get_dataset("synthetic", root, split_id=9)
    assert type(d) is {"ilidsvid": ILIDSVID, "prid2011": PRID2011}[fmt] and d.num_splits == 10
    assert {t[2] for t in d.train} == {0, 1} and {t[2] for t in d.query} == {0}
    assert [t[1] for t in d.query] == [t[1] for t in d.gallery]
    kept = len(d.splits[0]["train"]) + len(d.splits[0]["test"])
    if fmt == "ilidsvid":
        assert kept == 8 and len(d.query) == 4 and d.num_train_pids == 4
    else:  # tracklets of 20..40 frames: the 27-frame rule drops some of the 8 persons
        assert 2 <= kept < 8 and len(d.query) == kept // 2
        assert all(len(p) >= 27 for split in (d.train, d.query, d.gallery) for p, _, _ in split)


def test_synthetic_two_camera_limits(tmp_path):
    from fastnl.errors import UserError

    with pytest.raises(UserError, match="ilidsvid has exactly 2 cameras: --cams must be 2, got 4"):
        write_dataset(tmp_path / "a", fmt="ilidsvid", cams=4)
    with pytest.raises(UserError, match="--ids must be at most 200 for prid2011, got 201"):
        write_dataset(tmp_path / "b", fmt="prid2011", ids=201)
