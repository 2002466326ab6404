"""Test set-up: without a GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before
any test module imports fastnl. Tests that compile kernels ahead of time for a real GPU target
run in a subprocess with TRITON_INTERPRET=0.
"""
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The many shapes of the tests run with the default configurations; the tests marked gpu
    # check every configuration the autotuner may pick, and the autotuned path once.
    os.environ.setdefault("FASTNL_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
