"""The C++/CUDA operators (``torch.ops.fastnl``): the NLAM channel attention (paper eq. 3) and
the tail of an SE-ResNet50 bottleneck.

``load()`` imports the extension built by setup.py (``fastnl._C``); where the package was not
built (e.g. a machine whose Python ships its own torch), it compiles csrc/ once with
``torch.utils.cpp_extension.load`` into ``$FASTNL_BUILD_DIR`` (default ``~/.cache/fastnl``),
CUDA kernels included when CUDA is available. Set ``FASTNL_NO_JIT=1`` to skip that build.

Operators (x: [B, N, C, H, W]; the passes over x accumulate in float32, float64 for float64 x;
the shared MLP between them, on [B, N, C] pooled values, runs in float64 on every device):

- ``fastnl::channel_pool(x) -> (gmp, gap)``: [B, N, C] max and mean over H*W, one read of x.
- ``fastnl::channel_attention(x, w1, b1, w2, b2) -> out``: out = x * sigmoid(max_n m_n +
  mean_n a_n) with m_n = W2 tanh(W1 GMP(x_n) + b1) + b2 and a_n the same on GAP(x_n).
  Differentiable in x, w1, b1, w2, b2 through ``channel_attention_backward``.
- ``fastnl::channel_attention_backward(grad_out, x, w1, b1, w2, b2) -> (grad_x, grad_w1,
  grad_b1, grad_w2, grad_b2)``: the pooled values and the GMP argmax are recomputed in the same
  read of x that gives sum_hw grad_out * x; a max routes its gradient to the first maximum
  (over positions and over frames). grad_b1 / grad_b2 are returned even when b1 / b2 is None.
- ``fastnl::se_residual_relu(x, gate, shortcut) -> out``: relu(x * gate[n, c] + shortcut) for x,
  shortcut [N, C, H, W] (contiguous or channels_last), gate [N, C] in float32 (float64 for
  float64 x), one pass; ``fastnl::se_residual_relu_backward(grad_out, out, x, gate) -> (grad_x,
  grad_gate, grad_shortcut)`` in one pass over grad_out, out and x.
"""
from __future__ import annotations

import glob
import os
import threading
import warnings

import torch

_BUILD_HINT = (
    "the fastnl._C extension is not built: run `make install` (or "
    "`pip install --no-build-isolation -e .`) in the repository"
)
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_lock = threading.Lock()
_state: dict = {}
_warned: set = set()


def _build_dir(with_cuda: bool) -> str:
    root = os.environ.get("FASTNL_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastnl")
    tag = f"torch{torch.__version__.split('+')[0]}-{'cuda' if with_cuda else 'cpu'}"
    path = os.path.join(root, f"channel_attention-{tag}")
    os.makedirs(path, exist_ok=True)
    return path


def _jit_build() -> None:
    """Compile csrc/ for this Python's torch and load it (registers ``torch.ops.fastnl``)."""
    from torch.utils import cpp_extension

    if os.environ.get("FASTNL_NO_JIT", "0") == "1":
        raise ImportError("FASTNL_NO_JIT=1")
    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not sources:
        raise ImportError(f"no C++ sources under {_CSRC}")
    cu = sorted(glob.glob(os.path.join(_CSRC, "*.cu")))
    with_cuda = bool(cu) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    cflags = ["-O3"]
    cuda_cflags = ["-O3", "--use_fast_math", "-lineinfo"]
    if with_cuda:
        sources += cu
        cflags.append("-DFASTNL_WITH_CUDA")
        cuda_cflags.append("-DFASTNL_WITH_CUDA")
    try:
        cpp_extension.load(
            name="fastnl_channel_attention",
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_include_paths=[_CSRC],
            build_directory=_build_dir(with_cuda),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as err:  # compiler missing or failing
        raise ImportError(f"building csrc/ with torch.utils.cpp_extension.load failed: {err}") from err


def _ops_registered() -> bool:
    return hasattr(torch.ops.fastnl, "channel_attention")


def load():
    """Load the operators (the built ``fastnl._C``, else a JIT build) and register their
    fake and autograd implementations; returns ``torch.ops.fastnl``. Raises ImportError."""
    ops = _state.get("ops")
    if ops is not None:  # lock-free once loaded, so that torch.compile traces through
        return ops
    with _lock:
        if "error" in _state:
            raise ImportError(_state["error"])
        if "ops" in _state:
            return _state["ops"]
        try:
            from fastnl import _C  # noqa: F401
        except ImportError as err:
            try:
                _jit_build()
            except ImportError as jit_err:
                _state["error"] = f"{_BUILD_HINT} ({err}; {jit_err})"
                raise ImportError(_state["error"]) from jit_err
        if not _ops_registered():
            _state["error"] = f"{_BUILD_HINT} (the loaded library defines no fastnl::channel_attention)"
            raise ImportError(_state["error"])
        from fastnl import _channel_ops

        _channel_ops.register()
        # read once here, so that torch.compile traces has_kernels_for as a constant
        _state["device_types"] = _device_types("fastnl::channel_attention")
        from fastnl import _se_ops

        # a library built before the SE tail op existed has none: the callers fall back
        _state["se_device_types"] = _device_types("fastnl::se_residual_relu") if _se_ops.register() else frozenset()
        _state["ops"] = torch.ops.fastnl
        return _state["ops"]


def _device_types(op: str) -> frozenset:
    return frozenset(kind for kind, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(op, key))


def available() -> bool:
    try:
        load()
    except ImportError:
        return False
    return True


def has_kernels_for(device: torch.device) -> bool:
    """Whether the loaded extension has kernels for ``device``'s type (a build without nvcc
    has CPU kernels only)."""
    return torch.device(device).type in _state.get("device_types", ())


def has_se_kernels_for(device: torch.device) -> bool:
    """Whether the loaded extension has ``se_residual_relu`` kernels for ``device``'s type."""
    return torch.device(device).type in _state.get("se_device_types", ())


def missing_se_kernels_reason(device: torch.device) -> str:
    if "se_device_types" in _state and not _state["se_device_types"]:
        return ("the loaded fastnl._C extension predates fastnl::se_residual_relu "
                "(rebuild it: `make install`)")
    return missing_kernels_reason(device)


def missing_kernels_reason(device: torch.device) -> str:
    return (f"the fastnl._C extension was built without {torch.device(device).type.upper()} kernels "
            f"(rebuild it where nvcc and a CUDA build of torch are present: `make install`)")


def warn_missing_once(reason: str | None = None, what: str = "channel attention", stacklevel: int = 3) -> None:
    """One warning per op (``what``) that falls back to plain PyTorch; ``stacklevel`` as
    ``warnings.warn`` takes it, from this function (3: the caller of the op that falls back)."""
    if what not in _warned:
        reason = reason or _state.get("error", _BUILD_HINT)
        warnings.warn(f"{reason}; using the plain PyTorch {what}", RuntimeWarning, stacklevel=stacklevel)
        _warned.add(what)


def channel_attention(x, w1, b1, w2, b2):
    """NLAM channel attention (paper eq. 3) through ``torch.ops.fastnl.channel_attention``."""
    return load().channel_attention.default(x, w1, b1, w2, b2)


def channel_pool(x):
    """Per-frame GMP and GAP of x [B, N, C, H, W] -> two [B, N, C] tensors (float32/float64)."""
    return load().channel_pool.default(x)


def se_residual_relu(x, gate, shortcut):
    """relu(x * gate + shortcut) through ``torch.ops.fastnl.se_residual_relu`` (gate [N, C] in
    the accumulation dtype)."""
    return load().se_residual_relu.default(x, gate, shortcut)
