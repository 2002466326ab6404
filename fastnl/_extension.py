"""Loading the compiled C++/CUDA extension (``fastnl._C``) that implements channel attention."""
from __future__ import annotations

import warnings

_BUILD_HINT = (
    "the fastnl._C extension is not built: run `make install` (or "
    "`pip install --no-build-isolation -e .`) in the repository"
)
_warned = False


def load():
    """Import the compiled extension, registering the ``torch.ops.fastnl`` operators."""
    try:
        from fastnl import _C  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{_BUILD_HINT} ({err})") from err
    return _C


def available() -> bool:
    try:
        load()
    except ImportError:
        return False
    return True


def warn_missing_once() -> None:
    global _warned
    if not _warned:
        warnings.warn(f"{_BUILD_HINT}; using the plain PyTorch channel attention", RuntimeWarning, stacklevel=3)
        _warned = True


def channel_attention(x, w1, b1, w2, b2):
    load()
    raise NotImplementedError("channel attention operators are not registered by this build of fastnl._C")
