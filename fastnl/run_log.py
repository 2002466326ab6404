"""What a training run reports: a progress bar, a line per epoch, the CSV log (one row per
step), TensorBoard scalars when tensorboard is installed, and the training curve at the end.
Rank 0 writes; every rank takes part in :meth:`RunLog.sync`.

The step losses stay on the device until a sync, every ``log_every`` steps (and at the end of
an epoch, before a checkpoint, when a stop is asked for): one host synchronisation, and under
DDP one all-reduce, for the whole window instead of one per step.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

LOG_FILE = "log.csv"
CURVE_FILE = "training_curve.png"
LOG_FIELDS = ("step", "epoch", "batch", "loss", "ce", "triplet", "lr", "clips_per_s", "time_s")


@dataclass
class _Step:
    step: int
    epoch: int
    batch: int
    losses: torch.Tensor  # [loss, ce, triplet] on the device
    clips: int
    lr: float
    t0: float  # host clock at the start of the step
    t: float  # and at its end (the work may still run on the device)


@dataclass
class NonFinite:
    """The first step of a window whose mean loss is not finite (epoch and batch count from 1)."""
    step: int
    epoch: int
    batch: int
    loss: float


class RunLog:
    def __init__(self, out: Path, *, env, resume_step: int, tensorboard: bool, progress: bool, epochs: int):
        self.out, self.env, self.master = Path(out), env, env.is_main
        self.progress, self.epochs = progress, epochs
        self.t_start = time.perf_counter()
        self.pending: list[_Step] = []
        self.loss = float("nan")
        self.bar = None
        self.file = self.writer = self.tb = None
        if self.master:
            self.file, self.writer = _open_csv(self.out / LOG_FILE, resume_step)
            self.tb = _tensorboard(self.out, tensorboard)

    def print(self, *args) -> None:
        if self.master:
            print(*args, flush=True)

    def start_epoch(self, epoch: int, start_batch: int, batches: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=batches, initial=start_batch, desc=f"epoch {epoch + 1}/{self.epochs}",
                        disable=not (self.master and self.progress), dynamic_ncols=True, leave=False)

    def record(self, step: int, epoch: int, batch: int, loss, parts: dict, clips: int, lr: float,
               t0: float) -> None:
        """One step's detached losses (0-dim device tensors), kept on the device until the next sync."""
        losses = torch.stack([loss.float(), parts["ce"].float(), parts["triplet"].float()])
        self.pending.append(_Step(step, epoch, batch, losses, clips, lr, t0, time.perf_counter()))
        self.bar.update()

    def sync(self, stop_asked: bool) -> tuple[bool, NonFinite | None]:
        """Read the window's losses back (their mean over the ranks) and whether any rank asked to
        stop; write the window's rows up to the first non-finite loss, which is returned."""
        stats = torch.cat([*(s.losses for s in self.pending),
                           torch.tensor([float(stop_asked)], device=self.env.device)])
        if self.env.enabled:
            dist.all_reduce(stats)
            stats /= self.env.world_size
        values = stats.tolist()
        stop_flag = values.pop()
        losses = [values[i:i + 3] for i in range(0, len(values), 3)]
        window, self.pending = self.pending, []
        elapsed = time.perf_counter() - window[0].t0 if window else 0.0
        rate = sum(s.clips for s in window) * self.env.world_size / elapsed if elapsed > 0 else 0.0
        for s, (loss, ce, tri) in zip(window, losses):
            if not math.isfinite(loss):
                return stop_flag > 0, NonFinite(s.step, s.epoch + 1, s.batch + 1, loss)
            self.loss = loss
            self._write(s, loss, ce, tri, rate)
        if window:
            self.bar.set_postfix(loss=f"{self.loss:.3f}", lr=f"{window[-1].lr:.1e}", clips_s=f"{rate:.1f}")
        return stop_flag > 0, None

    def _write(self, s: _Step, loss: float, ce: float, tri: float, clips_per_s: float) -> None:
        if not self.master:
            return
        self.writer.writerow({"step": s.step, "epoch": s.epoch + 1, "batch": s.batch + 1,
                              "loss": f"{loss:.6g}", "ce": f"{ce:.6g}", "triplet": f"{tri:.6g}",
                              "lr": f"{s.lr:.6g}", "clips_per_s": f"{clips_per_s:.4g}",
                              "time_s": f"{s.t - self.t_start:.2f}"})
        if self.tb is not None:
            for key, value in (("loss", loss), ("ce", ce), ("triplet", tri), ("lr", s.lr),
                               ("clips_per_s", clips_per_s)):
                self.tb.add_scalar(f"train/{key}", value, s.step)

    def end_epoch(self) -> None:
        self.bar.close()

    def epoch_line(self, epoch: int, step: int, lr: float) -> None:
        self.flush()
        self.print(f"epoch {epoch}/{self.epochs}  step {step}  loss {self.loss:.4f}  lr {lr:.2e}")

    def flush(self) -> None:
        """Write out the CSV rows so far (before a checkpoint: the log is never behind it)."""
        if self.file is not None:
            self.file.flush()

    def close(self, *, plot: bool) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.master and plot:
            plot_training_curve(self.out / LOG_FILE, self.out / CURVE_FILE)


def _open_csv(path: Path, resume_step: int):
    """The CSV log, with any rows past ``resume_step`` (written after the last checkpoint) dropped."""
    rows = []
    if resume_step and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def _tensorboard(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def plot_training_curve(log_csv: Path, png: Path) -> Path | None:
    """Loss (total, CE, triplet) and learning rate against the step, from the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in ("loss", "ce", "triplet"):
        ax.plot(step, [float(r[key]) for r in rows], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(step, [float(r["lr"]) for r in rows], "k--", lw=1, label="lr")
    ax2.set_ylabel("learning rate")
    ax2.set_yscale("log")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title(f"training curve ({log_csv.parent.name})")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
