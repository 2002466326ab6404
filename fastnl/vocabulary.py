"""The ops' vocabulary and limits, in one place: the names of the implementations, back ends
and engines every layer accepts, the Triton kernel's head-dim rule and the interpreter flag.

Pure Python (no torch, no triton), so that :mod:`fastnl.kernels` may import it too.
"""
from __future__ import annotations

import os

# The model: how an NLAM is computed (fused kernels or the plain PyTorch reference).
MODEL_IMPLS = ("fused", "reference")
# ``fastnl.ops.nl_attention``'s back ends, and the three engines "auto" chooses among.
ATTENTION_BACKENDS = ("auto", "triton", "chunked", "torch", "plain", "reference")
ATTENTION_ENGINES = ("triton", "chunked", "torch")
TRITON_BACKENDS = ("triton", "chunked")  # the back ends that run Triton kernels
# Where the chunked engine does its row work (softmax statistics of a tile).
ROWWISE = ("triton", "torch")
# ``fastnl.ops.channel_attention``'s back ends.
CHANNEL_BACKENDS = ("auto", "extension", "reference")
# ``fastnl.ops.batch_norm_relu``'s back ends.
BN_RELU_BACKENDS = ("auto", "triton", "reference")
# Data loading back ends of the command line (``auto`` is accepted by the loader builders too).
LOADERS = ("torch", "dali")

# The flash kernel's head dimension D: a multiple of 16 (its D slices), at most 1024 (the
# output column chunks that keep the accumulator in registers).
TRITON_HEAD_DIM_MULTIPLE = 16
TRITON_MAX_HEAD_DIM = 1024


def triton_head_dim_ok(head_dim: int) -> bool:
    """Whether the flash kernel takes head dimension ``head_dim``."""
    return head_dim % TRITON_HEAD_DIM_MULTIPLE == 0 and 0 < head_dim <= TRITON_MAX_HEAD_DIM


def triton_interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``); read on every call, as
    a command may set it before the kernels are first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def request_triton_interpreter() -> None:
    """Run the Triton kernels under the interpreter unless the environment says otherwise; must
    come before triton decorates them (before the first import of the kernels)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
