"""Atomic checkpoint files: written to a temporary file, fsync'ed, then renamed over the target,
so a crash at any moment leaves either the previous checkpoint or the new one, never half of
one. Loaded with ``weights_only=True``: a checkpoint from elsewhere cannot run code."""
from __future__ import annotations

import os
import pickle
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
