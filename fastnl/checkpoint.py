"""Atomic checkpoint files: written to a temporary file, fsync'ed, then renamed over the target,
so a crash at any moment leaves either the previous checkpoint or the new one, never half of
one. Loaded with ``weights_only=True``: a checkpoint from elsewhere cannot run code."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fastnl.errors import UserError


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """torch.save ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a fastnl checkpoint (no 'model' entry)")
    return state
