"""`fastnl eval` on the multi-split datasets: each split's figures, their mean, the re-ranked
table, and the one-line errors for split options that do not apply."""
import json

import pytest
import torch

from fastnl.checkpoint import save_checkpoint
from fastnl.cli import main as cli_main
from fastnl.data.synthetic import write_dataset
from fastnl.model import build_model


@pytest.fixture(scope="module")
def ilids(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("ilids") / "d", fmt="ilidsvid", ids=8, seed=0,
                         size=(32, 16), min_frames=2, max_frames=4)
    return root


@pytest.mark.slow
def test_eval_splits_and_rerank(ilids, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(4, frames=2, impl="reference", verbose=False)
    for split in (0, 3):
        save_checkpoint({"model": model.state_dict(), "num_classes": 4,
                         "config": {"frames": 2, "height": 32, "width": 16, "impl": "reference"}},
                        tmp_path / f"s{split}" / "checkpoint.pt")
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "s{split}"), "--dataset", "ilidsvid",
                     "--root", str(ilids), "--split-ids", "0", "3", "--rerank", "--workers", "0",
                     "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ilidsvid split 3 (4 query, 4 gallery tracklets)" in printed
    assert printed.count("with k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3):") == 3
    summary = json.loads((tmp_path / "out" / "eval_ilidsvid_splits.json").read_text())
    assert summary["split_ids"] == [0, 3] and [s["split_id"] for s in summary["splits"]] == [0, 3]
    # 4 gallery tracklets: rank 5 and above are left out, of each split and of the mean
    assert "rank5" not in summary and all("rank5" not in s for s in summary["splits"])
    for key in ("mAP", "rank1"):
        values = [s[key] for s in summary["splits"]]
        assert summary[key] == pytest.approx(sum(values) / 2)
        assert summary["reranked"][key] == pytest.approx(
            sum(s["reranked"][key] for s in summary["splits"]) / 2)
    per = json.loads((tmp_path / "out" / "eval_ilidsvid_split3.json").read_text())
    assert per["split_id"] == 3 and per["num_query"] == 4 and per["mAP"] == summary["splits"][1]["mAP"]
    assert 0 < per["reranked"]["mAP"] <= 1
    # the table row of split 3 prints the JSON's numbers
    row = [line for line in printed.splitlines() if line.startswith("3 ")][0].split()
    assert row[1] == f"{100 * per['mAP']:.1f}%"


@pytest.mark.parametrize("args, message", [
    (["--split-id", "10"], "split id 10 out of range: ilidsvid has 10 splits (0..9)"),
    (["--split-id", "x"], "--split-id must be a split number or 'all', got 'x'"),
    (["--split-ids", "1", "1"], "--split-ids lists a split more than once: [1, 1]"),
    (["--splits-file", "s.json"], "--splits-file applies to prid2011 only"),
])
def test_eval_split_errors(ilids, tmp_path, capsys, args, message):
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--dataset", "synthetic",
                     "--root", str(ilids)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastnl eval: error: {message}") and err.count("\n") == 1


def test_eval_split_on_a_single_split_dataset(tmp_path, capsys):
    root = write_dataset(tmp_path / "m", fmt="mars", ids=4, cams=2, size=(16, 8))
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--dataset", "mars",
                     "--root", str(root), "--split-id", "all"]) == 2
    assert capsys.readouterr().err.startswith(
        "fastnl eval: error: mars has one fixed train/test split: --split-id, --split-ids and "
        "--splits-file apply to ilidsvid and prid2011 only")


def test_eval_splits_seed_is_for_prid_only(ilids, tmp_path, capsys):
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--dataset", "ilidsvid",
                     "--root", str(ilids), "--splits-seed", "3"]) == 2
    assert capsys.readouterr().err == ("fastnl eval: error: --splits-seed applies to prid2011 only "
                                       "(its splits are made from a seed when no splits file is "
                                       "given)\n")
