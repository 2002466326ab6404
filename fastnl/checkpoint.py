"""Atomic checkpoint files: written to a temporary file, fsync'ed, then renamed over the target,
so a crash at any moment leaves either the previous checkpoint or the new one, never half of
one. Loaded with ``weights_only=True``: a checkpoint from elsewhere cannot run code.

:class:`Checkpointer` is the checkpoint of a training run: what it holds, when it may be
written, how a run resumes from it."""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import torch

from fastnl.errors import UserError


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


_TEMP_SUFFIX = ".tmp"


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """torch.save ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Remove the temporary files :func:`save_checkpoint` leaves beside ``path`` when the process
    is killed (SIGKILL, power loss) in the middle of a write: only regular files named like its
    own (``.checkpoint.pt.XXXXXXXX.tmp``), only in that folder. Returns the removed paths.
    Call it when no other process writes checkpoints there (the start of a run)."""
    path = Path(path)
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"[A-Za-z0-9_]{8}" + re.escape(_TEMP_SUFFIX))
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed), at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (weights_only=True)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (give a run folder or a .pt file written by `fastnl train`)")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"cannot read checkpoint {path}: the file is empty (0 bytes); use a checkpoint "
                        "written by `fastnl train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. running whatever the pickle says: that
        # advice is not passed on. Keep only its reason.
        lines = [ln.strip() for ln in str(err).splitlines()]
        reason = next((ln for ln in lines if ln and not any(
            w in ln for w in ("weights_only", "Check the documentation", "Please file an issue"))), "")
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise UserError(f"refused to load {path}: it would call {found.group(1)} while unpickling (a "
                            "pickle can run any code; a fastnl checkpoint holds tensors and plain data only); "
                            "use a checkpoint written by `fastnl train`") from None
        raise UserError(f"cannot read checkpoint {path} ({size} bytes): not tensors and plain data"
                        + (f" ({reason})" if reason else "") + "; use a checkpoint written by `fastnl train`") from None
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path} ({size} bytes): {type(err).__name__}: "
                        f"{one_line(err)}; it is damaged or not a checkpoint written by `fastnl train`") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a fastnl checkpoint (no 'model' entry)")
    return state


# --------------------------------------------------------------------------------------------
# The checkpoint of a training run
# --------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def first_nonfinite(model: torch.nn.Module, optimizer) -> str | None:
    """The name of the first model tensor or optimizer state holding a NaN or an Inf, or None.
    One pass over each tensor (its min and max are finite iff all of it is), one sync."""
    named = [(f"the model's {name}", t) for name, t in model.state_dict().items()]
    named += [(f"the optimizer's {key}", v) for st in optimizer.state.values() for key, v in st.items()
              if torch.is_tensor(v)]
    named = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    with torch.no_grad():
        extremes = torch.stack([torch.stack(torch.aminmax(t.detach())).float().to(named[0][1].device)
                                for _, t in named])
        finite = torch.isfinite(extremes).all(dim=1).cpu()
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


class Checkpointer:
    """The checkpoint of the run in ``cfg.out``: model, optimizer, scaler, scheduler, RNG state
    and the (epoch, batch) position of the sampler, so that ``--resume`` continues exactly where
    a run stopped, mid-epoch included. Written atomically by rank 0 (every rank checks that the
    weights are finite first); ``saved_step`` is the step of the checkpoint on disk (None: none)."""

    def __init__(self, cfg, *, amp_dtype, master: bool, world_size: int):
        self.cfg, self.amp_dtype, self.master, self.world_size = cfg, amp_dtype, master, world_size
        self.out = Path(cfg.out)
        self.path = self.out / CHECKPOINT_FILE
        self.saved_step = None
        self.parts: dict = {}
        self.extra: dict = {}

    def load(self, resume: bool) -> dict | None:
        """The checkpoint to resume (None for a new run); a new run never overwrites one."""
        state = load_checkpoint(self.path) if resume else None
        if not resume and self.path.exists():
            raise UserError(f"{self.out} already holds a run ({self.path.name}): continue it with "
                            f"--resume {self.out}, or choose another --out")
        return state

    def attach(self, *, model, optimizer, scheduler, scaler, **extra) -> None:
        """The objects whose state the checkpoint holds; ``extra``: plain values saved beside them."""
        self.parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        self.extra = extra

    def restore(self, state: dict) -> tuple[int, int, int]:
        """Load ``state`` into the attached objects and the RNGs; returns (step, epoch, batch). A
        checkpoint that does not fit the run's config is one line. --lr and --amp may differ from
        the checkpoint's: the new base learning rate takes over from the current epoch's point of
        the schedule, and the change is printed."""
        from fastnl.train_config import CONFIG_FILE

        cfg, optimizer, scheduler, scaler = (self.cfg, self.parts["optimizer"], self.parts["scheduler"],
                                             self.parts["scaler"])
        try:
            self.parts["model"].load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") or not scaler.is_enabled():
                scaler.load_state_dict(state["scaler"])  # a scaler enabled by a change to --amp fp16 starts afresh
            set_rng_state(state["rng"])
            position = tuple(int(state[key]) for key in ("step", "epoch", "batch"))
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
            raise UserError(f"checkpoint {self.path} does not fit the run's {CONFIG_FILE} ({one_line(err)}); "
                            "resume it with the config it was written with, or start a new run with another "
                            "--out") from None
        old = state.get("config") or {}
        if "lr" in old and float(old["lr"]) != cfg.lr:
            factor = cfg.lr_gamma ** (position[1] // cfg.lr_step)
            for group in optimizer.param_groups:
                group["initial_lr"] = cfg.lr
                group["lr"] = cfg.lr * factor
            scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            if self.master:
                print(f"resuming with --lr {cfg.lr:g} (was {float(old['lr']):g}): learning rate now "
                      f"{optimizer.param_groups[0]['lr']:g}; recorded in {CONFIG_FILE}")
        if "amp" in old and old["amp"] != cfg.amp and self.master:
            print(f"resuming with --amp {cfg.amp} (was {old['amp']}); recorded in {CONFIG_FILE}")
        self.saved_step = position[0]
        return position

    def save(self, step: int, next_epoch: int, next_batch: int) -> None:
        """Write the state after ``step``, to continue at (``next_epoch``, ``next_batch``); weights
        that turned non-finite are never written (the error names the remedy)."""
        bad = first_nonfinite(self.parts["model"], self.parts["optimizer"])
        if bad is not None:
            raise UserError(f"step {step} left non-finite values in {bad}: the checkpoint was not written; "
                            + self.remedy(step + 1))
        if self.master:
            save_checkpoint({
                **{name: part.state_dict() for name, part in self.parts.items()},
                "rng": rng_state(), "step": step, "epoch": next_epoch, "batch": next_batch,
                "config": self.cfg.to_dict(), **self.extra, "world_size": self.world_size,
            }, self.path)
        self.saved_step = step

    def remedy(self, failed_step: int) -> str:
        """What to do after a non-finite loss (or weights) at ``failed_step``. A checkpoint is
        "good" when a later step computed a finite loss from its weights; the one written right
        before the failing step holds the very weights that failed, so resuming it with any --lr
        repeats the failure (another --amp may not)."""
        out, path, saved_step = self.out, self.path, self.saved_step
        lower = f"--lr {self.cfg.lr / 10:g}"
        amp = {torch.float16: "--amp bf16 or --amp off", torch.bfloat16: "--amp off"}.get(self.amp_dtype)
        if saved_step is not None and saved_step < failed_step - 1:
            return (f"last good checkpoint: {path} (step {saved_step}): continue with --resume {out} "
                    f"{lower}" + (f" (or {amp})" if amp else "") + " (a resumed run may change --lr and --amp)")
        fresh = f"start again with a lower --lr (another --out, or remove {out})"
        if saved_step is None:
            return "no checkpoint was written before it: " + fresh + (f", or use {amp}" if amp else "")
        return (f"the last checkpoint, {path} (step {saved_step}), holds the weights that gave it, so "
                "resuming it with any --lr repeats it: " + fresh
                + (f"; or --resume {out} with {amp}" if amp else ""))
