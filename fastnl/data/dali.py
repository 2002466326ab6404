"""NVIDIA DALI decoding for the clip loaders: the same output as :mod:`fastnl.data.transforms`.

One pipeline per loader: encoded frames arrive through ``fn.external_source`` as a flat batch
of ``clips x N`` JPEGs with a per-frame mirror flag (equal within a clip); they are decoded
(``device="mixed"`` on a GPU, ``"cpu"`` otherwise), resized with antialiasing and normalised
with the ImageNet mean/std into float32 ``[clips * N, 3, H, W]``. With a GPU the output stays
on the current CUDA device.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from fastnl.data.datasets.base import DatasetError, check_jpeg
from fastnl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastnl.errors import UserError
from fastnl.runtime import cuda_available

DALI_PACKAGE = "nvidia-dali-cuda130"
DALI_DEVICES = ("auto", "cpu", "gpu")  # where DALI decodes: "gpu" is nvJPEG ("mixed")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    if not dali_available():
        raise UserError(f"the DALI loader needs the package {DALI_PACKAGE} (pip install "
                        f"{DALI_PACKAGE}); or choose the torch loader (--loader torch)")


def _build(batch: int, height: int, width: int, threads: int, device_id):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id,
                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def clips():
        frames = fn.external_source(name="frames", dtype=types.UINT8, ndim=1)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        images = fn.decoders.image(frames, device="cpu" if device_id is None else "mixed",
                                   output_type=types.RGB)
        images = fn.resize(images, resize_x=width, resize_y=height,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(
            images, mirror=mirror,
            dtype=types.FLOAT, output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])

    pipe = clips()
    pipe.build()
    return pipe


class DaliDecoder:
    """Decodes up to ``max_frames`` encoded frames per call on a DALI pipeline.

    ``device``: "auto" (GPU when CUDA is available, with a fall-back to CPU if the mixed
    decoder cannot start), "cpu" or "gpu".
    """

    def __init__(self, max_frames: int, height: int, width: int, *, device: str = "auto",
                 threads: int = 2):
        require_dali()
        self.height, self.width = height, width
        use_gpu = device == "gpu" or (device == "auto" and cuda_available())
        self.pipe = None
        if use_gpu:
            try:
                self.pipe = _build(max_frames, height, width, threads,
                                   torch.cuda.current_device())
                self.device = torch.device("cuda", torch.cuda.current_device())
            except RuntimeError as err:
                if device == "gpu":
                    raise UserError(f"DALI could not start on the GPU: {err}") from None
                warnings.warn(f"DALI mixed decoding unavailable, decoding on CPU: {err}",
                              stacklevel=2)
        if self.pipe is None:
            self.pipe = _build(max_frames, height, width, threads, None)
            self.device = torch.device("cpu")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, encoded: Sequence[np.ndarray], mirror: Sequence[bool],
                 paths: Sequence[str]) -> torch.Tensor:
        """float32 [len(encoded), 3, H, W]; ``paths`` name the frames in error messages."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        self.pipe.feed_input("frames", list(encoded))
        self.pipe.feed_input("mirror", np.asarray(mirror, dtype=np.int32))
        try:
            (out,) = self.pipe.run()
        except RuntimeError as err:
            for path in paths:
                reason = check_jpeg(path)
                if reason is not None:
                    raise DatasetError(f"cannot decode frame {path}: {reason}") from None
            raise DatasetError(f"DALI could not decode a batch starting at {paths[0]}: "
                               f"{str(err).strip().splitlines()[0]}") from None
        tensor = out.as_tensor()
        if self.device.type == "cpu":
            return feed_ndarray(tensor, torch.empty(tensor.shape(), dtype=torch.float32))
        # Copy on a side stream and wait for it only: DALI may reuse its output buffer on the
        # next run, and the compute stream stays free; the consumer stream owns the result.
        with torch.cuda.stream(self._copy_stream):
            result = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, result, cuda_stream=self._copy_stream)
        self._copy_stream.synchronize()
        result.record_stream(torch.cuda.current_stream(self.device))
        return result
