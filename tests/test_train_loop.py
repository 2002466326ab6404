"""The training loop's host synchronisation: the losses are read back every ``log_every`` steps
(and at the end of an epoch), the CSV log still has one row per step, with the same numbers."""
import csv

import pytest

from fastnl.run_log import RunLog
from fastnl.train import TrainConfig, train

TINY = dict(frames=2, height=32, width=16, p=2, k=2, workers=0, progress=False, tensorboard=False, device="cpu",
            impl="reference", nlam_blocks=(), lr=1e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fastnl.data.synthetic import write_dataset

    # 10 train ids -> 5 batches of P = 2 ids per epoch
    return write_dataset(tmp_path_factory.mktemp("synth") / "data", fmt="mars", ids=20, cams=2, seed=0,
                         size=(32, 16), min_frames=2, max_frames=4)


def _rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_losses_are_read_back_every_k_steps_with_the_same_rows(data, tmp_path, monkeypatch):
    windows = []
    sync = RunLog.sync

    def counting(self, stop_asked):
        windows.append([s.step for s in self.pending])
        return sync(self, stop_asked)

    monkeypatch.setattr(RunLog, "sync", counting)
    every = train(TrainConfig(dataset="synthetic", root=str(data), out=str(tmp_path / "every"), epochs=2,
                              log_every=1, **TINY))
    assert windows == [[s] for s in range(1, 11)]
    windows.clear()
    batched = train(TrainConfig(dataset="synthetic", root=str(data), out=str(tmp_path / "k3"), epochs=2,
                                log_every=3, **TINY))
    # every 3 steps, and at the last batch of each epoch (5 batches per epoch)
    assert windows == [[1, 2, 3], [4, 5], [6], [7, 8, 9], [10]]
    assert every["step"] == batched["step"] == 10 and every["loss"] == batched["loss"]
    a, b = _rows(tmp_path / "every"), _rows(tmp_path / "k3")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(s) for s in range(1, 11)]
    for key in ("epoch", "batch", "loss", "ce", "triplet", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key
