"""Clip loaders for training and testing, on a torch ``DataLoader`` or an NVIDIA DALI pipeline.

Both back ends share one plan per batch (the frame paths of each clip, its flip, its labels),
computed in the main process, so the choice of back end changes the decoder only. All
randomness of a training batch (ids and tracklets from the :class:`PKSampler`, the frames of
each clip, its flip) is a function of ``(seed, epoch, batch number, item)``: a run resumed
with ``set_epoch(epoch, start_batch=i)`` sees exactly the batches an uninterrupted run saw.

``workers`` is the number of ``DataLoader`` worker processes for the torch back end (0 decodes
in the calling process) and the number of DALI CPU threads for the DALI back end.
"""
from __future__ import annotations

import abc
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastnl.data.dali import DALI_DEVICES, dali_available, require_dali
from fastnl.data.datasets.base import DatasetError, Tracklet
from fastnl.data.sampling import SAMPLING_MODES, PKSampler, sample_train_indices, test_sequences
from fastnl.data.transforms import load_clip, normalize, read_bytes
from fastnl.errors import UserError
from fastnl.runtime import cuda_available
from fastnl.vocabulary import LOADERS

BACKENDS = LOADERS + ("auto",)


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``dali`` with a GPU and DALI installed, else ``torch``."""
    if backend == "auto":
        return "dali" if cuda_available() and dali_available() else "torch"
    if backend == "dali":
        require_dali()
    elif backend != "torch":
        raise UserError(f"unknown loader back end {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


@dataclass(frozen=True)
class BatchPlan:
    """What one batch holds: N frame paths per clip, a flip per clip, label columns."""

    clips: tuple[tuple[str, ...], ...]
    flips: tuple[bool, ...]
    labels: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class _Failure:
    message: str


class _TorchDecode(Dataset):
    """Decodes a whole :class:`BatchPlan` (the "index") in one worker."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def __getitem__(self, plan: BatchPlan):
        frames = len(plan.clips[0])
        clips = torch.empty((len(plan.clips), frames, 3, self.height, self.width))
        try:
            for j, (paths, flip) in enumerate(zip(plan.clips, plan.flips)):
                normalize(load_clip(paths, self.height, self.width, flip), out=clips[j])
        except DatasetError as err:
            return _Failure(str(err))
        return (clips,) + tuple(torch.tensor(col, dtype=torch.long) for col in plan.labels)


class _PlanSampler(Sampler):
    def __init__(self, loader: "_ClipLoader"):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.plans())

    def __len__(self) -> int:
        return len(self.loader.plans())


class _ClipLoader(abc.ABC):
    """Iterates decoded batches for a list of :class:`BatchPlan` given by ``plans()``."""

    def __init__(self, *, frames: int, height: int, width: int, backend: str, workers: int,
                 max_clips: int, dali_device: str = "auto"):
        if frames < 1 or height < 1 or width < 1:
            raise UserError(f"frames, height and width must be positive, got {frames}, "
                            f"{height}, {width}")
        self.frames, self.height, self.width = frames, height, width
        self.backend = resolve_backend(backend)
        self.workers = max(0, workers)
        self.max_clips = max_clips
        if dali_device not in DALI_DEVICES:
            raise UserError(f"unknown DALI device {dali_device!r}: choose one of {', '.join(DALI_DEVICES)}")
        self.dali_device = dali_device
        self._torch_loader = None
        self._dali = None

    @abc.abstractmethod
    def plans(self) -> list[BatchPlan]:
        """The batches the next iteration yields, in order."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.backend == "dali":
            return self._iter_dali()
        return self._iter_torch()

    def _iter_torch(self):
        if self._torch_loader is None:
            self._torch_loader = DataLoader(
                _TorchDecode(self.height, self.width), batch_size=None,
                sampler=_PlanSampler(self), num_workers=self.workers,
                pin_memory=cuda_available())
        batches = iter(self._torch_loader)
        try:
            for item in batches:
                if isinstance(item, _Failure):
                    raise DatasetError(item.message)
                yield item
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # now, not whenever the iterator is collected

    def _iter_dali(self):
        from fastnl.data.dali import DaliDecoder

        if self._dali is None:
            self._dali = DaliDecoder(self.max_clips * self.frames, self.height, self.width,
                                     device=self.dali_device, threads=max(1, self.workers))

        def read(plan: BatchPlan):
            paths = [p for clip in plan.clips for p in clip]
            return paths, [np.frombuffer(read_bytes(p), dtype=np.uint8) for p in paths]

        plans = self.plans()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(read, plans[0]) if plans else None
            for i, plan in enumerate(plans):
                paths, encoded = pending.result()
                if i + 1 < len(plans):
                    pending = pool.submit(read, plans[i + 1])
                mirror = np.repeat(np.asarray(plan.flips, dtype=np.int32), self.frames)
                out = self._dali(encoded, mirror, paths)
                clips = out.view(len(plan.clips), self.frames, 3, self.height, self.width)
                yield (clips,) + tuple(torch.tensor(col, dtype=torch.long)
                                       for col in plan.labels)


class TrainLoader(_ClipLoader):
    """Training batches ``(clips float32 [P*K, N, 3, H, W], pids [P*K], camids [P*K])``.

    ``len()`` is the number of batches per epoch on this rank; call ``set_epoch`` before each
    epoch (``start_batch`` skips the batches a resumed run has already seen).
    """

    def __init__(self, tracklets: Sequence[Tracklet], sampler: PKSampler, *, frames: int,
                 height: int, width: int, seed: int, backend: str, workers: int,
                 sampling: str, flip: bool, dali_device: str = "auto"):
        if sampling not in SAMPLING_MODES:
            raise UserError(f"unknown frame sampling {sampling!r}: choose one of "
                            f"{', '.join(SAMPLING_MODES)}")
        super().__init__(frames=frames, height=height, width=width, backend=backend,
                         workers=workers, max_clips=sampler.p * sampler.k, dali_device=dali_device)
        self.tracklets = list(tracklets)
        self.sampler = sampler
        self.seed, self.sampling, self.flip = seed, sampling, flip
        self.epoch, self.start_batch = 0, 0
        self._cache: tuple | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        self.epoch, self.start_batch = epoch, start_batch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def plan(self, batch: int, indices: Sequence[int]) -> BatchPlan:
        """The clips of batch ``batch`` (its number in the epoch) of the current epoch."""
        clips, flips, pids, camids = [], [], [], []
        for item, index in enumerate(indices):
            paths, pid, camid = self.tracklets[index]
            rng = np.random.default_rng([self.seed, self.epoch, batch, item])
            frames = sample_train_indices(len(paths), self.frames, rng, self.sampling)
            clips.append(tuple(paths[f] for f in frames))
            flips.append(bool(self.flip and rng.random() < 0.5))
            pids.append(pid)
            camids.append(camid)
        return BatchPlan(tuple(clips), tuple(flips), (tuple(pids), tuple(camids)))

    def plans(self) -> list[BatchPlan]:
        key = (self.epoch, self.start_batch)
        if self._cache is None or self._cache[0] != key:
            batches = self.sampler.epoch_batches(self.epoch)[self.start_batch:]
            self._cache = (key, [self.plan(b, idx) for b, idx in batches])
        return self._cache[1]


class TestLoader(_ClipLoader):
    """Test batches ``(clips float32 [b, N, 3, H, W], tracklet_idx [b])``: every tracklet cut
    into consecutive N-frame sequences (see :func:`test_sequences`), in tracklet order."""

    __test__ = False

    def __init__(self, tracklets: Sequence[Tracklet], *, frames: int, height: int, width: int,
                 batch_size: int, backend: str, workers: int, dali_device: str = "auto"):
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        super().__init__(frames=frames, height=height, width=width, backend=backend,
                         workers=workers, max_clips=batch_size, dali_device=dali_device)
        self.batch_size = batch_size
        self.sequences = []
        for t, (paths, _, _) in enumerate(tracklets):
            if not paths:
                raise DatasetError(f"tracklet {t} has no frames")
            for seq in test_sequences(len(paths), frames):
                self.sequences.append((t, tuple(paths[f] for f in seq)))
        self._plans = [
            BatchPlan(tuple(s[1] for s in chunk), (False,) * len(chunk),
                      (tuple(s[0] for s in chunk),))
            for chunk in (self.sequences[i:i + batch_size]
                          for i in range(0, len(self.sequences), batch_size))]

    def __len__(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def plans(self) -> list[BatchPlan]:
        return self._plans


def _tracklets_of(dataset, split: str) -> list[Tracklet]:
    return list(getattr(dataset, split)) if hasattr(dataset, split) else list(dataset)


def build_train_loader(dataset, *, frames: int = 8, height: int = 256, width: int = 128,
                       p: int = 8, k: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                       backend: str = "torch", workers: int = 2, sampling: str = "restricted",
                       flip: bool = True, dali_device: str = "auto") -> TrainLoader:
    """P x K batches of N-frame clips from ``dataset.train`` (or a list of tracklets).
    ``dali_device`` (backend "dali"): "auto" (GPU "mixed" decoding when CUDA is available),
    "cpu" or "gpu"."""
    tracklets = _tracklets_of(dataset, "train")
    try:
        sampler = PKSampler([pid for _, pid, _ in tracklets], p=p, k=k, seed=seed, rank=rank,
                            world_size=world_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    return TrainLoader(tracklets, sampler, frames=frames, height=height, width=width, seed=seed,
                       backend=backend, workers=workers, sampling=sampling, flip=flip,
                       dali_device=dali_device)


def build_test_loader(tracklets, *, frames: int = 8, height: int = 256, width: int = 128,
                      batch_size: int = 32, backend: str = "torch", workers: int = 2,
                      dali_device: str = "auto") -> TestLoader:
    """Consecutive N-frame sequences of every tracklet, ``batch_size`` sequences a batch."""
    return TestLoader(list(tracklets), frames=frames, height=height, width=width,
                      batch_size=batch_size, backend=backend, workers=workers, dali_device=dali_device)
