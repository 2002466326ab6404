"""Clip loader benchmark (``fastnl bench loader``): training batches per second on a synthetic
MARS-layout dataset at 256x128, P x K = 8 x 4 clips of N = 8 frames.

The torch ``DataLoader`` (PIL decoding in ``min(8, cpus)`` worker processes) always runs; the
DALI pipeline (``device="mixed"``: JPEG decoding on the GPU) runs where DALI is installed and a
GPU is there, and is listed as skipped, with the reason, elsewhere. ``--quick``: 16 ids, P = 4,
2 workers. Batches come from an endless sequence of epochs (``set_epoch`` at each start); the
timer (:mod:`fastnl.benchmarks.timer`, host clock) times blocks of batches after one untimed
block that pays the workers' start-up, so a row gives the median seconds per batch with its
20th/80th percentiles, and the clips and frames per second at the median.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

from fastnl.benchmarks import generic_table, live_rows, timer

FRAMES, K = 8, 4
COLUMNS = ["backend", "decode", "workers", "batches", "batch_ms", "batch_p20_ms", "batch_p80_ms", "clips_per_s",
           "frames_per_s", "skipped"]


def endless(loader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_backend(dataset, backend: str, *, p: int, workers: int, block: int, runs: int) -> dict:
    """One row: ``runs`` timed blocks of ``block`` batches of ``backend``."""
    from fastnl.data.loader import build_train_loader

    loader = build_train_loader(dataset, frames=FRAMES, p=p, k=K, backend=backend, workers=workers)
    batches = endless(loader)

    def take_block():
        for _ in range(block):
            next(batches)

    try:
        timing = timer.measure(take_block, "cpu", warmup=1, runs=runs, min_time_s=0.0, clock="host")
    finally:
        batches.close()  # stops the workers now
    per_batch = {k: v / block for k, v in timing.fields("batch_").items()}
    clips = p * K
    return {"backend": backend, "decode": "mixed (GPU)" if backend == "dali" else "cpu (PIL)", "workers": workers,
            "batches": block * timing.runs, **per_batch, "clips_per_s": 1e3 * clips / per_batch["batch_ms"],
            "frames_per_s": 1e3 * FRAMES * clips / per_batch["batch_ms"], "timer": timing.timer}


def run(device, quick: bool = False) -> list[dict]:
    """One row per loader back end (DALI: measured, or skipped with the reason)."""
    from fastnl.data.dali import dali_available
    from fastnl.data.datasets import get_dataset
    from fastnl.data.synthetic import write_dataset

    device = str(device)
    rows = live_rows()
    p, workers = (4, 2) if quick else (8, min(8, os.cpu_count() or 1))
    block, runs = (2, 2) if quick else (4, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(os.path.join(tmp, "mars"), ids=16 if quick else 64, size=(256, 128),
                             min_frames=FRAMES, max_frames=3 * FRAMES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = get_dataset("synthetic", root)
        rows.append(time_backend(dataset, "torch", p=p, workers=workers, block=block, runs=runs))
        _log(rows[-1])
        if not dali_available():
            rows.append({"backend": "dali", "skipped": "DALI is not installed here"})
        elif not device.startswith("cuda"):
            rows.append({"backend": "dali", "skipped": "GPU decoding needs a CUDA device"})
        else:
            rows.append(time_backend(dataset, "dali", p=p, workers=workers, block=block, runs=runs))
        _log(rows[-1])
    return rows


def _log(row: dict) -> None:
    text = row.get("skipped") or f"{row['clips_per_s']:.1f} clips/s, {row['batch_ms']:.1f} ms a batch"
    print(f"  loader {row['backend']}: {text}", file=sys.stderr, flush=True)


def format_table(rows: list[dict]) -> str:
    return generic_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])
