"""Train and test clip loaders: shapes, labels, content, resumable determinism, the DALI back
end against the torch one, and decode errors at load time."""
import math
import os
import sys
import warnings

import pytest
import torch

from fastnl.data.datasets import DatasetError, get_dataset
from fastnl.data.loader import build_test_loader, build_train_loader, resolve_backend
from fastnl.data.synthetic import write_dataset
from fastnl.data.transforms import IMAGENET_STD, load_clip, normalize
from fastnl.errors import UserError

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # normalised units -> grey levels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("loader") / "mars", fmt="mars", ids=16, cams=3,
                         seed=1, size=(64, 32), min_frames=3, max_frames=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_dataset("synthetic", root)


def small_train(data, **kw):
    args = dict(frames=4, height=32, width=16, p=4, k=2, seed=7, workers=0)
    args.update(kw)
    return build_train_loader(data, **args)


def test_train_batches_shapes_labels_and_content(data):
    loader = small_train(data)
    loader.set_epoch(0)
    assert len(loader) == 2 and data.num_train_pids == 8
    seen_ids, flips = [], []
    for (clips, pids, camids), plan in zip(loader, loader.plans()):
        assert clips.shape == (8, 4, 3, 32, 16) and clips.dtype == torch.float32
        assert pids.dtype == camids.dtype == torch.long and pids.shape == camids.shape == (8,)
        for j in range(8):
            tracklet = [t for t in data.train if set(plan.clips[j]) <= set(t[0])]
            assert len(tracklet) == 1 and (tracklet[0][1], tracklet[0][2]) == (pids[j], camids[j])
            order = [tracklet[0][0].index(p) for p in plan.clips[j]]
            assert order == sorted(order)
            expected = normalize(load_clip(plan.clips[j], 32, 16, plan.flips[j]))
            assert torch.equal(clips[j], expected)
        assert pids.view(4, 2).unique(dim=1).shape == (4, 1)
        seen_ids += pids[::2].tolist()
        flips += plan.flips
    assert sorted(seen_ids) == list(range(8))
    assert 0 < sum(flips) < len(flips)
    assert not any(small_train(data, flip=False).plans()[0].flips)


def test_resumed_epoch_sees_the_same_batches_with_any_workers(data):
    loader = small_train(data)
    loader.set_epoch(3)
    full = list(loader)
    resumed = small_train(data, workers=2)
    resumed.set_epoch(3, start_batch=1)
    rest = list(resumed)
    assert len(rest) == 1
    assert all(torch.equal(a, b) for a, b in zip(full[1], rest[0]))
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader))[0], full[0][0])
    with pytest.raises(ValueError, match="start_batch 3 outside 0..2"):
        loader.set_epoch(0, start_batch=3)


def test_random_sampling_mode_and_bad_options(data):
    loader = small_train(data, sampling="random")
    assert len(loader.plans()) == 2
    with pytest.raises(UserError, match="unknown frame sampling 'every'"):
        small_train(data, sampling="every")
    with pytest.raises(UserError, match="needs at least P=16 identities, the data has 8"):
        small_train(data, p=16)
    with pytest.raises(UserError, match="unknown loader back end 'ffmpeg'"):
        small_train(data, backend="ffmpeg")


def test_test_loader_cuts_every_tracklet(data):
    tracklets = data.query + data.gallery
    loader = build_test_loader(tracklets, frames=4, height=32, width=16, batch_size=5, workers=1)
    expected_seqs = sum(math.ceil(len(t[0]) / 4) for t in tracklets)
    assert len(loader) == math.ceil(expected_seqs / 5)
    batches = list(loader)
    idx = torch.cat([b[1] for b in batches])
    assert idx.tolist() == sorted(idx.tolist()) and len(idx) == expected_seqs
    assert [int((idx == t).sum()) for t in range(len(tracklets))] == [
        math.ceil(len(t[0]) / 4) for t in tracklets]
    clips = torch.cat([b[0] for b in batches])
    assert clips.shape == (expected_seqs, 4, 3, 32, 16)
    paths = tracklets[0][0]
    first = normalize(load_clip(paths[:4], 32, 16))
    assert torch.equal(clips[0], first)
    last = int((idx == len(tracklets) - 1).nonzero()[-1])
    tail = tracklets[-1][0][(math.ceil(len(tracklets[-1][0]) / 4) - 1) * 4:]
    padded = [tail[i % len(tail)] for i in range(4)]
    assert torch.equal(clips[last], normalize(load_clip(padded, 32, 16)))


# Max difference in grey levels: the JPEG decoders agree exactly (frames are 64 x 32), the
# resamplers round differently (upscale) and use different antialiasing filters (downscale).
DALI_TOLERANCE = {(64, 32): 0.01, (128, 64): 1.01, (32, 16): 8.0}


@pytest.mark.parametrize("size", list(DALI_TOLERANCE))
def test_dali_matches_torch(data, size):
    pytest.importorskip("nvidia.dali")
    h, w = size
    tol = DALI_TOLERANCE[size]
    torch_batches = list(small_train(data, height=h, width=w))
    dali = small_train(data, height=h, width=w, backend="dali", dali_device="cpu")  # the same libjpeg
    dali_batches = list(dali)
    assert len(dali_batches) == len(torch_batches) == 2
    for a, b in zip(torch_batches, dali_batches):
        assert b[0].shape == a[0].shape and b[0].dtype == torch.float32
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        diff = ((a[0] - b[0]) * STD).abs()
        assert diff.max() <= tol and diff.mean() <= 0.3
    test_t = list(build_test_loader(data.query, frames=4, height=h, width=w, workers=0))
    test_d = list(build_test_loader(data.query, frames=4, height=h, width=w, backend="dali", dali_device="cpu"))
    assert len(test_t) == len(test_d)
    for a, b in zip(test_t, test_d):
        assert torch.equal(a[1], b[1]) and ((a[0] - b[0]) * STD).abs().max() <= tol


@pytest.mark.gpu
def test_dali_mixed_decoding_gives_cuda_batches(data):
    """GPU ("mixed", nvJPEG) decoding: the same batches as the torch loader, on the GPU. Its
    pixels come from another JPEG decoder, so only the batch means are compared: 0.05 in
    normalised units is about 3 grey levels, far above two conforming decoders' difference and
    far below what a swapped colour order or a missing normalisation gives."""
    pytest.importorskip("nvidia.dali")
    torch_batches = list(small_train(data, height=64, width=32))
    dali_batches = list(small_train(data, height=64, width=32, backend="dali", dali_device="gpu"))
    assert len(dali_batches) == len(torch_batches) == 2
    for a, b in zip(torch_batches, dali_batches):
        assert b[0].is_cuda and b[0].shape == a[0].shape and b[0].dtype == torch.float32
        assert torch.equal(a[1], b[1].cpu()) and torch.equal(a[2], b[2].cpu())
        assert torch.isfinite(b[0]).all()
        assert abs(b[0].mean().item() - a[0].mean().item()) < 0.05


def test_dali_device_is_checked(data):
    with pytest.raises(UserError, match="unknown DALI device 'tpu'"):
        small_train(data, dali_device="tpu")


def test_dali_missing_is_a_user_error(monkeypatch, data):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(UserError, match="needs the package nvidia-dali-cuda130"):
        small_train(data, backend="dali")
    assert resolve_backend("auto") == "torch"


@pytest.fixture
def damaged(tmp_path):
    root = write_dataset(tmp_path / "d", fmt="dukevideo", ids=4, cams=2, seed=0, size=(32, 16),
                         min_frames=2, max_frames=3)
    data = get_dataset("synthetic", root)
    return data


@pytest.mark.parametrize("backend,workers", [("torch", 0), ("torch", 1), ("dali", 0)])
def test_truncated_frame_fails_at_load_time_naming_it(damaged, backend, workers):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    bad = damaged.query[1][0][1]
    with open(bad, "r+b") as f:
        f.truncate(60)
    loader = build_test_loader(damaged.query, frames=2, height=32, width=16, batch_size=1,
                               backend=backend, workers=workers)
    with pytest.raises(DatasetError, match=f"cannot decode frame {bad}: "):
        list(loader)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_frame_removed_after_reading_fails_naming_it(damaged, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    gone = damaged.train[0][0][0]
    os.unlink(gone)
    loader = build_test_loader(damaged.train, frames=2, height=32, width=16, backend=backend,
                               workers=0)
    with pytest.raises(DatasetError, match=f"frame {gone}: cannot read it: No such file"):
        list(loader)
