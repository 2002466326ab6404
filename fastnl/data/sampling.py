"""Temporal sampling of frames within a tracklet, and the P x K identity sampler.

Training takes N frames per tracklet: *restricted random* (the tracklet split into N equal
chunks, one frame drawn from each, so the clip spans the whole tracklet in order) or plain
*random* (N distinct frames, sorted; with repetition when the tracklet is shorter than N).
Testing cuts the whole tracklet into consecutive N-frame sequences, the evaluation averages
their descriptors.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

SAMPLING_MODES = ("restricted", "random")


def sample_train_indices(num_frames: int, n: int, rng: np.random.Generator,
                         mode: str = "restricted") -> np.ndarray:
    """N frame indices (int64, non-decreasing) into a tracklet of ``num_frames`` frames.

    ``restricted``: chunk i is ``[floor(i F / N), floor((i+1) F / N))`` (at least one frame
    wide, so a short tracklet repeats frames) and one index is drawn uniformly from each.
    ``random``: N distinct frames uniformly at random (with replacement if F < N), sorted.
    """
    if num_frames < 1:
        raise ValueError(f"a tracklet needs at least one frame, got {num_frames}")
    if mode == "restricted":
        edges = (np.arange(n + 1, dtype=np.int64) * num_frames) // n
        lo = edges[:-1]
        hi = np.maximum(edges[1:], lo + 1)
        return lo + (rng.random(n) * (hi - lo)).astype(np.int64)
    if mode == "random":
        idx = rng.choice(num_frames, size=n, replace=num_frames < n)
        return np.sort(idx).astype(np.int64)
    raise ValueError(f"unknown sampling mode {mode!r}: choose one of {SAMPLING_MODES}")


def test_sequences(num_frames: int, n: int) -> np.ndarray:
    """All consecutive N-frame sequences of a tracklet as int64 [ceil(F / N), N].

    The last sequence is padded by repeating its own frames in order (``[8, 9]`` with N = 4
    becomes ``[8, 9, 8, 9]``), so every frame counts and no frame of another sequence is reused.
    """
    if num_frames < 1:
        raise ValueError(f"a tracklet needs at least one frame, got {num_frames}")
    count = math.ceil(num_frames / n)
    idx = np.arange(count * n, dtype=np.int64)
    tail = (count - 1) * n
    last = num_frames - tail
    idx[tail:] = tail + np.arange(n) % last
    return idx.reshape(count, n)


test_sequences.__test__ = False  # not a pytest test, despite the name


class PKSampler:
    """Batches of P identities x K tracklets each, as lists of dataset indices.

    Every epoch visits the ids in a fresh random order, each id once per batch and once per
    epoch: the ids are cut into batches of P; an incomplete last batch is filled with other
    ids, and extra batches are added until the count divides ``world_size``, so some ids may
    appear twice in such an epoch. An id with fewer than K tracklets gives all of them plus
    repeats drawn at random. Batch ``b`` of the epoch goes to rank ``b % world_size``: the
    ranks get disjoint, equally many batches. Everything is a function of ``(seed, epoch)``.
    """

    def __init__(self, pids: Sequence[int], p: int = 8, k: int = 4, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be positive, got P={p}, K={k}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        by_pid: dict[int, list[int]] = {}
        for index, pid in enumerate(pids):
            by_pid.setdefault(int(pid), []).append(index)
        if len(by_pid) < p:
            raise ValueError(f"P x K sampling needs at least P={p} identities, the data has "
                             f"{len(by_pid)}")
        self.pid_list = sorted(by_pid)
        self.tracklets = [np.asarray(by_pid[pid], dtype=np.int64) for pid in self.pid_list]
        self.p, self.k, self.seed = p, k, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        batches = math.ceil(len(self.pid_list) / p)
        self.num_batches = math.ceil(batches / world_size) * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.num_batches // self.world_size

    def _id_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        num_ids = len(self.pid_list)
        order = rng.permutation(num_ids)
        groups = [order[i:i + self.p] for i in range(0, num_ids, self.p)]
        while len(groups) < self.num_batches or len(groups[-1]) < self.p:
            last = groups.pop() if len(groups[-1]) < self.p else order[:0]
            others = np.setdiff1d(np.arange(num_ids), last)
            fill = rng.choice(others, size=self.p - len(last), replace=False)
            groups.append(np.concatenate([last, fill]))
        return groups

    def _pick(self, rng: np.random.Generator, tracklets: np.ndarray) -> np.ndarray:
        if len(tracklets) >= self.k:
            return rng.choice(tracklets, size=self.k, replace=False)
        return np.concatenate([rng.permutation(tracklets),
                               rng.choice(tracklets, size=self.k - len(tracklets))])

    def epoch_batches(self, epoch: int | None = None) -> list[tuple[int, list[int]]]:
        """This rank's batches of ``epoch`` as ``(batch number in the epoch, indices)``."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, 0x5eed])
        out = []
        for b, group in enumerate(self._id_batches(rng)):
            picks = [self._pick(rng, self.tracklets[i]) for i in group]
            if b % self.world_size == self.rank:
                out.append((b, np.concatenate(picks).tolist()))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.epoch_batches():
            yield indices
