"""`fastnl extract` and `fastnl search` on a small folder of tracklets: outputs, bad frames,
the CSV form, and one-line errors."""
import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastnl.checkpoint import save_checkpoint
from fastnl.cli import main as cli_main
from fastnl.descriptors import find_query, find_tracklets, load_tracklets, read_tracklet_csv
from fastnl.errors import UserError
from fastnl.evaluation import extract_descriptors
from fastnl.model import build_model

CFG = {"frames": 2, "height": 32, "width": 16, "impl": "reference"}


def _image(seed, fmt):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    tracks = {"day1/camA/t1": 3, "day1/camA/t2": 1, "day1/camB/t10": 4, "day2/t3": 2}
    for i, (name, n) in enumerate(tracks.items()):
        (root / "tracks" / name).mkdir(parents=True)
        for f in (1, 2, 10, 11)[:n]:
            ext = "png" if i % 2 else "jpg"
            (root / "tracks" / name / f"f{f}.{ext}").write_bytes(_image(10 * i + f, "PNG" if i % 2 else "JPEG"))
    (root / "tracks" / "day1" / "notes.txt").write_text("not a frame")
    torch.manual_seed(0)
    model = build_model(3, frames=2, impl="reference", verbose=False).eval()
    save_checkpoint({"model": model.state_dict(), "num_classes": 3, "config": CFG},
                    root / "run" / "checkpoint.pt")
    return root, model


def test_find_tracklets_and_csv(setup, tmp_path):
    root, _ = setup
    found = find_tracklets(root / "tracks")
    assert [n for n, _ in found] == ["day1/camA/t1", "day1/camA/t2", "day1/camB/t10", "day2/t3"]
    assert [p.rsplit("/", 1)[1] for p in found[2][1]] == ["f1.jpg", "f2.jpg", "f10.jpg", "f11.jpg"]
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("tracklet", "frame"))
        for name, frames in found:
            for p in frames:
                w.writerow((name.upper(), p))
        w.writerow(("X", "rel/a.png"))
    got = load_tracklets(listing)
    assert [(n.lower(), p) for n, p in got[:4]] == [(n.lower(), p) for n, p in found]
    assert got[4] == ("X", [str(tmp_path / "rel" / "a.png")])
    listing.write_text("name,path\na,b\n")
    with pytest.raises(UserError, match="expected a header with the columns tracklet,frame "
                                        r"\(found name,path\)"):
        read_tracklet_csv(listing)
    with pytest.raises(UserError, match="tracklet folder not found"):
        load_tracklets(tmp_path / "none")
    rows = [{"tracklet": n} for n, _ in found]
    assert find_query(rows, "camB/t10") == 2 and find_query(rows, "day2/t3/") == 3
    with pytest.raises(UserError, match=r"'day2/t4' is not a tracklet of index.csv \(closest: day2/t3"):
        find_query(rows, "day2/t4")


@pytest.mark.slow
def test_extract_and_search(setup, tmp_path, capsys):
    root, model = setup
    bad = root / "tracks" / "day1" / "camB" / "t10" / "f2.jpg"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated JPEG
    try:
        args = ["extract", "--checkpoint", str(root / "run"), "--input", str(root / "tracks"),
                "--workers", "0", "--no-progress", "--out", str(tmp_path / "d")]
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastnl extract: error: cannot decode frame {bad}: ")
        assert err.endswith("; --skip-bad leaves bad frames out\n")
        assert cli_main(args + ["--skip-bad", "--normalize"]) == 0
        captured = capsys.readouterr()
        assert f"skipped bad frame: cannot decode frame {bad}" in captured.err
    finally:
        bad.write_bytes(good_bytes)
    desc = np.load(tmp_path / "d" / "descriptors.npy")
    assert desc.shape == (4, 2048) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, rtol=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "d" / "index.csv")))
    assert [(r["tracklet"], r["frames_used"], r["frames_skipped"]) for r in rows] == [
        ("day1/camA/t1", "3", "0"), ("day1/camA/t2", "1", "0"), ("day1/camB/t10", "3", "1"),
        ("day2/t3", "2", "0")]
    # the evaluation's protocol on the frames used
    frames = [tuple(p for p in f if p != str(bad)) for _, f in find_tracklets(root / "tracks")]
    want = extract_descriptors(model, [(f, 0, 0) for f in frames], frames=2, height=32, width=16,
                               workers=0, progress=False)
    want = torch.nn.functional.normalize(want, dim=1).numpy()
    np.testing.assert_allclose(desc, want, rtol=0, atol=1e-5)

    assert cli_main(["search", "--descriptors", str(tmp_path / "d" / "descriptors.npy"),
                     "--query", "camA/t1", "--top", "2", "--png", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    d = np.linalg.norm(desc - desc[0], axis=1)
    order = [j for j in np.argsort(d, kind="stable") if j != 0][:2]
    assert printed[0] == "query day1/camA/t1 (3 frames); 2 nearest of 3:"
    assert [line.split()[2] for line in printed[2:4]] == [rows[j]["tracklet"] for j in order]
    assert [float(line.split()[1]) for line in printed[2:4]] == pytest.approx(
        [round(float(d[j]), 4) for j in order], abs=1e-4)
    with Image.open(tmp_path / "s.png") as img:
        assert img.size == (3 * (64 + 8) + 12, 128 + 8 + 28)  # query + 2 tiles of 128x64
    assert cli_main(["search", "--descriptors", str(tmp_path / "none"), "--query", "x"]) == 2
    assert "descriptors not found" in capsys.readouterr().err
