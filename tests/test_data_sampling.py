"""Frame sampling within a tracklet and the P x K identity sampler (counts, coverage, DDP)."""
from collections import Counter

import numpy as np
import pytest

from fastnl.data.sampling import PKSampler, sample_train_indices, test_sequences


@pytest.mark.parametrize("num_frames", [1, 3, 8, 13, 100])
def test_restricted_sampling_takes_one_frame_per_chunk(num_frames):
    n = 8
    for seed in range(20):
        idx = sample_train_indices(num_frames, n, np.random.default_rng(seed), "restricted")
        assert idx.dtype == np.int64 and idx.shape == (n,)
        assert np.all(np.diff(idx) >= 0) and 0 <= idx.min() and idx.max() < num_frames
        for i, f in enumerate(idx):
            lo, hi = i * num_frames // n, (i + 1) * num_frames // n
            assert lo <= f < max(hi, lo + 1)
    if num_frames == n:
        assert list(idx) == list(range(n))


def test_restricted_sampling_reaches_every_frame_of_a_chunk():
    seen = Counter()
    for seed in range(400):
        seen.update(sample_train_indices(16, 4, np.random.default_rng(seed)).tolist())
    assert sorted(seen) == list(range(16))


def test_random_sampling():
    idx = sample_train_indices(20, 8, np.random.default_rng(0), "random")
    assert len(set(idx.tolist())) == 8 and list(idx) == sorted(idx) and idx.max() < 20
    short = sample_train_indices(3, 8, np.random.default_rng(0), "random")
    assert list(short) == sorted(short) and set(short.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="unknown sampling mode 'dense'"):
        sample_train_indices(20, 8, np.random.default_rng(0), "dense")
    with pytest.raises(ValueError, match="at least one frame"):
        sample_train_indices(0, 8, np.random.default_rng(0))


def test_test_sequences_are_consecutive_and_padded():
    assert test_sequences(10, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 8, 9]]
    assert test_sequences(8, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert test_sequences(1, 3).tolist() == [[0, 0, 0]]
    assert test_sequences(7, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert test_sequences(300, 8).shape == (38, 8)


def _pids(counts):
    """Dataset pids: id i has counts[i] tracklets, interleaved as in a real list."""
    pids = [pid for pid, c in enumerate(counts) for _ in range(c)]
    return list(np.random.default_rng(0).permutation(pids))


COUNTS = [1, 2, 3, 4, 5, 9] * 4  # 24 ids, several with fewer than K tracklets


def test_pk_batches_cover_every_id_once_per_epoch():
    pids = _pids(COUNTS)
    sampler = PKSampler(pids, p=8, k=4, seed=1)
    assert len(sampler) == 3
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 3
        seen = []
        for batch in batches:
            assert len(batch) == 32
            ids = [pids[i] for i in batch]
            for j in range(8):
                assert ids[j * 4:(j + 1) * 4] == [ids[j * 4]] * 4
                group = batch[j * 4:(j + 1) * 4]
                if COUNTS[ids[j * 4]] >= 4:
                    assert len(set(group)) == 4
                else:
                    assert set(group) == {i for i, p in enumerate(pids) if p == ids[j * 4]}
            seen += ids[::4]
        assert sorted(seen) == list(range(24))


def test_pk_sampler_is_deterministic_per_seed_and_epoch():
    pids = _pids(COUNTS)
    a, b = PKSampler(pids, seed=3), PKSampler(pids, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b)
    assert list(a) != list(PKSampler(pids, seed=4).epoch_batches(5))


def test_pk_ranks_get_disjoint_shares():
    pids = _pids(COUNTS)
    whole = PKSampler(pids, p=8, k=4, seed=2).epoch_batches(4)
    ranks = [PKSampler(pids, p=8, k=4, seed=2, rank=r, world_size=3).epoch_batches(4)
             for r in range(3)]
    assert [len(r) for r in ranks] == [1, 1, 1]
    assert sorted(b for r in ranks for b in r) == whole
    flat = [i for r in ranks for _, batch in r for i in batch]
    assert sum(len(set(batch)) for r in ranks for _, batch in r) == len(set(flat))


def test_pk_pads_incomplete_batches_and_ranks():
    pids = _pids([2] * 20)
    ranks = [PKSampler(pids, p=8, k=2, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in ranks] == [2, 2]
    batches = [batch for s in ranks for batch in s]
    assert len(batches) == 4
    ids = [[pids[i] for i in batch][::2] for batch in batches]
    assert all(len(set(g)) == 8 for g in ids)
    assert set(i for g in ids for i in g) == set(range(20))
    numbers = [b for s in ranks for b, _ in s.epoch_batches()]
    assert sorted(numbers) == [0, 1, 2, 3]


def test_pk_rejects_too_few_ids():
    with pytest.raises(ValueError, match="needs at least P=8 identities, the data has 5"):
        PKSampler(_pids([4] * 5), p=8)
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        PKSampler(_pids([4] * 9), rank=2, world_size=2)
