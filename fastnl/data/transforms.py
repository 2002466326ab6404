"""Frame decoding and the clip transform of the torch loader: decode, resize, flip, normalise.

The DALI loader (:mod:`fastnl.data.dali`) applies the same steps: bilinear resize with
antialiasing to uint8, a horizontal flip shared by all frames of a clip, ImageNet mean/std.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fastnl.data.datasets.base import DatasetError, read_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) * 255
_INV_STD = 1 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) * 255)


def decode_frame(path: str) -> torch.Tensor:
    """uint8 [3, h, w] RGB; a truncated or undecodable JPEG (or a path that is not a regular
    file) raises :class:`DatasetError`; garbled data libjpeg decodes into damaged blocks gives
    a warning naming the file (Pillow itself says nothing)."""
    from fastnl.data.jpeg_check import corrupt_data

    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.array(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot decode frame {path}: {err}") from None
    reason = corrupt_data(data)
    if reason is not None:
        warnings.warn(f"corrupt frame {path}: {reason}; it decodes into damaged blocks (find every such "
                      "frame with --verify)", stacklevel=2)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def load_clip(paths: Sequence[str], height: int, width: int, flip: bool = False) -> torch.Tensor:
    """Frames resized to (height, width) (bilinear, antialiased), flipped together: uint8
    [N, 3, height, width]."""
    frames = []
    for path in paths:
        img = decode_frame(path)
        if img.shape[1:] != (height, width):
            img = TF.resize(img, [height, width], antialias=True)
        frames.append(img)
    clip = torch.stack(frames)
    return clip.flip(-1) if flip else clip


def normalize(clips: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 ``(x / 255 - mean) / std`` with ImageNet statistics,
    written into ``out`` when given."""
    if out is None:
        out = torch.empty(clips.shape, dtype=torch.float32)
    return out.copy_(clips).sub_(_MEAN).mul_(_INV_STD)
