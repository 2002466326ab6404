"""Where and in what precision a run computes, decided once for every command: the device,
the AMP (autocast) dtype, the autocast context and the GradScaler.

``--device``: auto (the GPU when one is visible), cpu, cuda or cuda:N. ``--amp``: auto (bf16 on
CUDA, float16 on a GPU without bf16, off on CPU), bf16, fp16 or off. A GradScaler is on for
float16 only (bf16 has float32's range). Under ``torchrun`` (RANK/WORLD_SIZE set) a process
joins the process group, NCCL on GPU and gloo on CPU, one GPU per process (LOCAL_RANK).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fastnl.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The GPU when one is visible, else the CPU."""
    return torch.device("cuda" if cuda_available() else "cpu")


def resolve_device(name: str | None = "auto") -> torch.device:
    """The device for ``--device name``: auto (or None), cpu, cuda or cuda:N; a CUDA device that
    is not there, or another name, is a :class:`UserError` naming the option."""
    if name is None or name == "auto":
        return default_device()
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device must be auto, cpu or cuda[:index], got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        raise UserError(f"--device {name} was given but no CUDA device is visible to torch "
                        f"{torch.__version__}; use --device cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def resolve_amp(amp: str, device) -> torch.dtype | None:
    """The autocast dtype (None: full precision) for ``--amp amp`` on ``device``."""
    if amp == "auto":
        if torch.device(device).type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return AMP_DTYPES[amp]
    except KeyError:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}") from None


def autocast(device, dtype: torch.dtype | None):
    """The autocast region of ``dtype`` on ``device``'s type; None: autocast off."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that scales the loss for float16 only (a no-op for bf16 and full precision)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype is torch.float16)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Distributed:
    """This process's place in the run for ``--device device``: alone, or (launched by torchrun)
    joined to the process group on the GPU of its LOCAL_RANK or on the CPU."""
    single = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=single)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = single.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank,
                       torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
