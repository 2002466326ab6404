"""`fastnl demo` end to end on a tiny configuration: dataset, training, evaluation, report."""
import csv
import json

import pytest

from fastnl import cli

pytestmark = pytest.mark.slow  # each trains and evaluates the network


def test_demo_pipeline_on_a_tiny_configuration(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--ids", "8", "--cams", "2", "--frames", "2", "--height", "32",
                     "--width", "16", "--p", "2", "--k", "2", "--epochs", "1", "--workers", "0"])
    text = capsys.readouterr().out
    assert code == 0
    assert "reduced setting" in text and "8 frames at 256x128" in text  # what was reduced, and from what
    assert "chance" in text and "rank1" in text and "mAP" in text
    results = json.loads((out / "run" / "eval_synthetic.json").read_text())
    assert 0.0 <= results["mAP"] <= 1.0 and 0.0 <= results["chance"]["mAP"] <= 1.0
    assert results["num_query"] == 4  # one query per test id
    assert {p.name for p in (out / "run").iterdir()} >= {"checkpoint.pt", "config.yaml", "log.csv",
                                                         "training_curve.png"}


def test_demo_writes_nothing_outside_a_temporary_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert cli.main(["demo", "--ids", "4", "--cams", "2", "--frames", "2", "--height", "32", "--width", "16",
                     "--p", "2", "--k", "2", "--epochs", "1", "--workers", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not any((tmp_path / "tmp").iterdir())


def test_demo_gives_one_result_per_seed(tmp_path, capsys):
    """Bounded by epochs (not minutes), the demo's training and evaluation repeat exactly: the
    synthetic data, the initialisation, the data order and the loader workers all follow --seed."""
    def demo(name, seed):
        out = tmp_path / name
        assert cli.main(["demo", "--out", str(out), "--ids", "8", "--cams", "2", "--frames", "2", "--height", "32",
                         "--width", "16", "--p", "2", "--k", "2", "--epochs", "2", "--workers", "2",
                         "--seed", str(seed)]) == 0
        results = json.loads((out / "run" / "eval_synthetic.json").read_text())
        with open(out / "run" / "log.csv", newline="") as f:  # all but the timings
            losses = [{k: v for k, v in row.items() if k not in ("clips_per_s", "time_s")} for row in csv.DictReader(f)]
        return results, losses

    first, again, other = demo("a", 0), demo("b", 0), demo("c", 1)
    capsys.readouterr()
    assert first[1] and first == again  # the same losses at every step, the same metrics
    assert first[1] != other[1]  # and a seed that changes them
