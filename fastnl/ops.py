"""Public entry points of the NLAM kernels, each with a ``backend`` switch.

``nl_attention``: the NLAM spatial attention, paper eq. (1).
``channel_attention``: the NLAM channel attention, paper eq. (3).
``se_residual_relu``: the tail of an SE-ResNet50 bottleneck (SE rescale, residual sum, ReLU).
``batch_norm_relu``: a training-mode BatchNorm and the ReLU after it.
``bn_se_residual_relu``: a bottleneck's last BatchNorm, SE module, residual sum and ReLU.

Inputs are validated here once, so every backend sees well-formed tensors.
"""
from __future__ import annotations

import math
import os
import sys
from typing import NamedTuple

import torch

from fastnl import reference
from fastnl._running_stats import lerp_running
from fastnl.vocabulary import ATTENTION_BACKENDS, BN_RELU_BACKENDS, CHANNEL_BACKENDS, TRITON_MAX_HEAD_DIM  # noqa: F401
from fastnl.vocabulary import triton_head_dim_ok
from fastnl.vocabulary import triton_interpreted as _triton_interpreted

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, t, ndim: int, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {expected} ({ndim} dims), got {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}, expected {expected} with every size >= 1")


def _check_vectors(items, names: list, tensors: list) -> tuple[list, list]:
    """Check the optional 1-d tensors of ``items`` ((name, tensor or None, size, shape text));
    returns ``names`` and ``tensors`` with the given ones appended (for the device check)."""
    for name, t, size, shape in items:
        if t is None:
            continue
        _check_tensor(name, t, 1, shape)
        if t.shape[0] != size:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        names.append(name)
        tensors.append(t)
    return names, tensors


def _check_devices(names, tensors) -> None:
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}: all must be on one device")


def _check_same(names, tensors) -> None:
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {names[0]} has {first.dtype}: all must match")
    _check_devices(names, tensors)


def _check_map_and_shortcut(name: str, x, shortcut) -> None:
    """``name`` and the shortcut: [N, C, H, W] float tensors of one shape."""
    _check_tensor(name, x, 4, "[N, C, H, W]")
    _check_tensor("shortcut", shortcut, 4, "[N, C, H, W]")
    if shortcut.shape != x.shape:
        raise ValueError(f"shortcut must have {name}'s shape {tuple(x.shape)}, got {tuple(shortcut.shape)}")


def _check_gate(gate, N: int, C: int, what: str = "gate must have shape") -> None:
    """An SE gate: a tensor of shape [N, C] or [N, C, 1, 1] (a ValueError starting ``what``)."""
    if not isinstance(gate, torch.Tensor) or tuple(gate.shape) not in ((N, C), (N, C, 1, 1)):
        got = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
        raise ValueError(f"{what} [N, C] = [{N}, {C}] or [{N}, {C}, 1, 1], got {got}")


def _extension_runs(op: str, device: torch.device, backend: str, has_kernels, reason_for, what: str) -> bool:
    """Whether the compiled extension runs ``op`` on ``device`` for ``backend`` ("auto" or
    "extension"). "auto" falls back to plain PyTorch (False) with one warning per ``what``;
    "extension" raises instead, ImportError or RuntimeError naming the cause."""
    from fastnl import _extension

    if backend == "auto" and not _extension.available():
        _extension.warn_missing_once(what=what, stacklevel=4)
        return False
    _extension.load()  # ImportError naming the cause for backend="extension"
    if not has_kernels(device):
        reason = reason_for(device)
        if backend == "extension":
            raise RuntimeError(f"{op} on {device}: {reason}")
        _extension.warn_missing_once(reason, what=what, stacklevel=4)
        return False
    return True


def nl_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                 backend: str = "auto") -> torch.Tensor:
    """``softmax(scale * q @ k^T, dim=-1) @ v`` over all L positions of a clip (paper eq. 1).

    q, k, v: [B, L, D] with any strides (e.g. the transposed [B, D, L] output of a 1x1 conv),
    float32/float16/bfloat16 (float64 for the torch and reference backends), on one device.
    Returns [B, L, D] in q's dtype, differentiable in q, k and v.

    backend: "auto" (on CUDA the engine that :mod:`fastnl.attention_engines`' table picks for
    (GPU, dtype, D, L), see ``auto_attention_backend``; the chunked torch path elsewhere),
    "triton" (the flash kernel), "chunked" (query blocks on tensor-core GEMMs, the row work in
    Triton kernels), "torch" (the same engine with the row work in PyTorch ops), "plain" (the
    attention as written in plain PyTorch: bmm, softmax, bmm, run under the caller's autocast;
    materialises L x L) or "reference" (the float32 ground truth; materialises L x L).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    names = ("q", "k", "v")
    for name, t in zip(names, (q, k, v)):
        _check_tensor(name, t, 3, "[B, L, D]")
    _check_same(names, (q, k, v))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all have shape [B, L, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if backend == "auto":
        backend = auto_attention_backend(q.device.type, q.dtype, q.shape[-1], q.shape[1], q.device)
    if backend == "plain":
        return reference.nl_attention_plain(q, k, v, scale)
    with _no_autocast(q):
        return _nl_attention(q, k, v, scale, backend)


def auto_attention_backend(device_type: str, dtype: torch.dtype, head_dim: int, seq_len: int = 1024,
                           device=None) -> str:
    """What ``backend="auto"`` runs (see ``explain_auto_backend`` for why)."""
    return explain_auto_backend(device_type, dtype, head_dim, seq_len, device)[0]


def explain_auto_backend(device_type: str, dtype: torch.dtype, head_dim: int, seq_len: int = 1024,
                         device=None) -> tuple[str, str]:
    """(backend, why) of ``backend="auto"``: on CUDA, the engine table's choice for (GPU
    capability, dtype, D, L) (:func:`fastnl.attention_engines.choose`); the flash kernel only for
    what it supports (float32 / float16 / bfloat16, D a multiple of 16 up to 1024); "torch"
    (the chunked engine in PyTorch ops) on CPU, for float64, and where Triton is missing, so
    "auto" never refuses an input that "torch" accepts."""
    if device_type != "cuda":
        return "torch", f"on {device_type}: the chunked engine in PyTorch ops"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "torch", f"{dtype} is not a Triton dtype: the chunked engine in PyTorch ops"
    if not _triton_available():
        return "torch", "Triton is not importable: the chunked engine in PyTorch ops"
    from fastnl import attention_engines

    engine, why = attention_engines.choose(dtype, head_dim, seq_len, _capability(device))
    if engine == "triton" and not triton_head_dim_ok(head_dim):
        return "chunked", f"the flash kernel needs D a multiple of 16 up to {TRITON_MAX_HEAD_DIM} (D={head_dim})"
    return engine, why


_CAPABILITIES: dict = {}


def _capability(device) -> tuple | None:
    """The compute capability of a CUDA device (read once per device), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITIES[index]


def _no_autocast(t: torch.Tensor):
    """Every backend accumulates in float32 (or wider) itself and returns the input dtype, so an
    enclosing autocast region must not recast the matmuls inside the ops."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _nl_attention(q, k, v, scale: float, backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference.nl_attention(q, k, v, scale)
    if backend == "torch":
        from fastnl.attention_chunked import nl_attention_chunked

        return nl_attention_chunked(q, k, v, scale, rowwise="torch")
    # backend "triton" or "chunked": Triton kernels
    if not q.is_cuda and not _triton_interpreted():
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
            "before importing fastnl, or use backend='torch'"
        )
    if not q.is_cuda:
        problem = triton_interpreter_problem()
        if problem:
            raise RuntimeError(problem)
    kernels = _load_triton_kernels()
    if backend == "chunked":
        from fastnl.attention_chunked import nl_attention_chunked

        return nl_attention_chunked(q, k, v, scale, rowwise="triton")
    return kernels.nl_attention_triton(q, k, v, scale=scale)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels in this environment, or None.

    Triton 3.6 and older turn a runtime scalar (the kernels' L) into an int with
    ``int(array_of_one_element)``, which numpy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); Triton 3.7 fixed it. Compiled GPU runs are not affected.
    """
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run with numpy {numpy.__version__} "
                "(it converts one-element arrays with int(), which numpy 2.4 refuses): install "
                "'numpy<2.4' or triton>=3.7, or use backend='torch' on CPU")
    return None


def _triton_available() -> bool:
    try:
        _load_triton_kernels()
    except ImportError:
        return False
    return True


def _load_triton_kernels():
    kernels = sys.modules.get("fastnl.kernels")  # once imported, a lookup that torch.compile traces
    if kernels is None:
        from fastnl._paths import import_kernels

        kernels = import_kernels()
    return kernels


def channel_attention(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None, *, backend: str = "auto") -> torch.Tensor:
    """NLAM channel attention (paper eq. 3) on A_S = ``x`` of shape [B, N, C, H, W].

    ``m_n = W2 tanh(W1 GMP(x_n) + b1) + b2``, ``a_n = W2 tanh(W1 GAP(x_n) + b1) + b2``;
    returns ``x * sigmoid(max_n m_n + mean_n a_n)`` broadcast over frames and positions.
    w1: [R, C], b1: [R] or None, w2: [C, R], b2: [C] or None. Differentiable in all.

    backend: "auto" (the compiled extension: CUDA kernels on GPU, C++ on CPU), "extension",
    or "reference" (plain PyTorch).
    """
    if backend not in CHANNEL_BACKENDS:
        raise ValueError(f"backend must be one of {CHANNEL_BACKENDS}, got {backend!r}")
    _check_tensor("x", x, 5, "[B, N, C, H, W]")
    C = x.shape[2]
    _check_tensor("w1", w1, 2, "[R, C]")
    R = w1.shape[0]
    if w1.shape[1] != C:
        raise ValueError(f"w1 must have shape [R, C] = [R, {C}], got {tuple(w1.shape)}")
    _check_tensor("w2", w2, 2, f"[C, R] = [{C}, {R}]")
    if tuple(w2.shape) != (C, R):
        raise ValueError(f"w2 must have shape [C, R] = [{C}, {R}], got {tuple(w2.shape)}")
    names, tensors = _check_vectors((("b1", b1, R, f"[{R}]"), ("b2", b2, C, f"[{C}]")), ["x", "w1", "w2"],
                                    [x, w1, w2])
    _check_devices(names, tensors)

    with _no_autocast(x):
        from fastnl import _extension

        if backend == "reference" or not _extension_runs(
                "channel_attention", x.device, backend, _extension.has_kernels_for,
                _extension.missing_kernels_reason, "channel attention"):
            return reference.channel_attention(x, w1, b1, w2, b2)
        return _extension.channel_attention(x, w1, b1, w2, b2)


def se_residual_relu(x: torch.Tensor, gate: torch.Tensor, shortcut: torch.Tensor, *,
                     backend: str = "auto") -> torch.Tensor:
    """``relu(x * gate + shortcut)``: the squeeze-and-excitation rescale, the residual sum and the
    ReLU that end every SE-ResNet bottleneck, in one pass (one read of x and shortcut, one write;
    the backward one read of the gradient, the output and x, and one write of each input's
    gradient, where plain PyTorch makes three passes forward and five backward).

    x, shortcut: [N, C, H, W] (contiguous or channels_last kept, any other layout copied);
    gate: [N, C] or [N, C, 1, 1] (the SE module's sigmoid). Differentiable in all three. The
    result has the dtype plain PyTorch would give (the promotion of the three); the extension
    computes in float32 (float64 for float64) and rounds once.

    backend: "auto" (the compiled extension: CUDA kernels on GPU, C++ on CPU; plain PyTorch
    with a warning where it is missing), "extension", or "reference" (plain PyTorch).
    """
    if backend not in CHANNEL_BACKENDS:
        raise ValueError(f"backend must be one of {CHANNEL_BACKENDS}, got {backend!r}")
    _check_map_and_shortcut("x", x, shortcut)
    N, C = x.shape[:2]
    _check_gate(gate, N, C)
    if not gate.is_floating_point():
        raise TypeError(f"gate must be floating point, got {gate.dtype}")
    _check_devices(("x", "shortcut", "gate"), (x, shortcut, gate))
    from fastnl import _extension

    if backend == "reference" or not _extension_runs(
            "se_residual_relu", x.device, backend, _extension.has_se_kernels_for,
            _extension.missing_se_kernels_reason, "SE block tail"):
        return reference.se_residual_relu(x, gate, shortcut)
    dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), shortcut.dtype)  # as plain ops give
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with _no_autocast(x):
        return _extension.se_residual_relu(x.to(dtype), gate.reshape(N, C).to(acc), shortcut.to(dtype))


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def batch_norm_relu_backend(x: torch.Tensor, training: bool, weight, bias) -> str:
    """What ``batch_norm_relu(..., backend="auto")`` runs: "triton" for training-mode batch
    statistics of a CUDA float32 / float16 / bfloat16 map with an affine weight and bias (where
    Triton imports), "reference" (``F.batch_norm`` and ``relu``) otherwise, and always where the
    environment sets ``FASTNL_BN_RELU=reference``."""
    choice = os.environ.get("FASTNL_BN_RELU", "auto")
    if choice not in ("auto", "reference"):
        raise ValueError(f"FASTNL_BN_RELU must be 'auto' or 'reference', got {choice!r}")
    if (choice == "auto" and x.is_cuda and training and weight is not None and bias is not None and x.dtype in _TRITON_DTYPES
            and _triton_available()):
        return "triton"
    return "reference"


def _check_triton_bn(x: torch.Tensor, training: bool, weight, bias, name: str = "x") -> None:
    """The conditions of the Triton BatchNorm kernels (backend='triton'), each a clear error."""
    if not training:
        raise ValueError("backend='triton' computes batch statistics (training=True); in eval mode use "
                         "backend='auto' or 'reference'")
    if weight is None or bias is None:
        raise ValueError("backend='triton' needs an affine weight and bias (BatchNorm2d(affine=True))")
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for backend='triton', got {x.dtype}")
    from torch._subclasses.fake_tensor import is_fake

    # a real CPU tensor (not the fake ones of a count or of torch.compile's tracing)
    if not x.is_cuda and not torch.compiler.is_compiling() and not is_fake(x):
        if not _triton_interpreted():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {x.device}); on CPU set TRITON_INTERPRET=1 "
                             "before importing fastnl, or use backend='reference'")
        problem = triton_interpreter_problem()
        if problem:
            raise RuntimeError(problem)
    N, _C, H, W = x.shape
    if x[0].numel() >= 2**31:
        raise ValueError(f"backend='triton' addresses one image's C*H*W elements in 32 bits; got {tuple(x.shape)}")
    if N * H * W < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def _check_bn_vectors(x, running_mean, running_var, weight, bias, name: str = "x") -> None:
    C = x.shape[1]
    per_channel = f"[C] = [{C}] ({name}'s channels)"
    names, tensors = _check_vectors([(vector, t, C, per_channel) for vector, t in (
        ("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))],
        [name], [x])
    _check_devices(names, tensors)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")


def _update_running(running_mean, running_var, stats: torch.Tensor, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` from the kernels' stats (row 0
    the mean, row 2 the unbiased variance), as ``F.batch_norm`` updates them."""
    if running_mean is not None and running_var is not None and momentum != 0.0:
        # both in one launch on a GPU; in the fused model's forward, with every other op's
        # (fastnl._running_stats)
        lerp_running([running_mean, running_var],
                     [stats[0].to(running_mean.dtype), stats[2].to(running_var.dtype)], float(momentum))


def batch_norm_relu(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, *, training: bool,
                    momentum: float = 0.1, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    x: [N, C, H, W]; running_mean, running_var: [C] or None (updated in place in training mode,
    ``running = (1 - momentum) * running + momentum * batch``, the variance unbiased, as
    ``F.batch_norm`` does); weight, bias: [C]. Differentiable in x, weight and bias.

    backend: "auto" (see :func:`batch_norm_relu_backend`), "triton" (the kernels of
    ``fastnl.kernels.batch_norm``: the batch statistics in one read of x, the normalisation and
    the ReLU in one more read and one write, the backward in two reads of the gradient and of x
    and one write, where plain PyTorch's BatchNorm and ReLU make five passes forward and eight
    backward; training mode, float32 / float16 / bfloat16 x, weight and bias given; y and the
    gradient of x in x's dtype and layout), or "reference" (``F.batch_norm`` then ``relu``).
    """
    if backend not in BN_RELU_BACKENDS:
        raise ValueError(f"backend must be one of {BN_RELU_BACKENDS}, got {backend!r}")
    _check_tensor("x", x, 4, "[N, C, H, W]")
    _check_bn_vectors(x, running_mean, running_var, weight, bias)
    if backend == "auto":
        backend = batch_norm_relu_backend(x, training, weight, bias)
    if backend == "reference":
        return reference.batch_norm_relu(x, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_triton_bn(x, training, weight, bias)
    bn = _load_triton_kernels().batch_norm
    y, stats = bn.batch_norm_relu_triton(x if bn.dense_layout(x) else x.contiguous(), weight, bias, eps)
    _update_running(running_mean, running_var, stats, momentum)
    return y


class ShortcutNorm(NamedTuple):
    """A training-mode BatchNorm of the shortcut (a downsampling bottleneck's, after its 1x1
    convolution) for :func:`bn_se_residual_relu` to apply in its tail: the running statistics
    ([C] or None, updated in place as ``F.batch_norm`` does), the affine weight and bias ([C]),
    the momentum and eps, as ``nn.BatchNorm2d`` holds them."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    momentum: float = 0.1
    eps: float = 1e-5


def bn_se_residual_relu(y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        weight: torch.Tensor | None, bias: torch.Tensor | None, excite, shortcut: torch.Tensor, *,
                        training: bool, momentum: float = 0.1, eps: float = 1e-5,
                        backend: str = "auto", shortcut_sink=None,
                        shortcut_norm: ShortcutNorm | None = None) -> torch.Tensor:
    """The end of an SE-ResNet bottleneck from its last convolution's output ``y``:
    ``relu(x * excite(x.mean((2, 3), keepdim=True)) + shortcut)`` with
    ``x = F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)``.

    y, shortcut: [N, C, H, W] of one dtype; running_mean, running_var: [C] or None (updated in
    place in training mode, as ``F.batch_norm`` does); weight, bias: [C]; ``excite``: the SE
    module's excitation, a function of the [N, C, 1, 1] squeeze (y's dtype) returning the gate
    ([N, C, 1, 1] or [N, C]), run by autograd as it is; for backend "triton" the gate must be
    computed from that squeeze (a ValueError otherwise). Differentiable in y, weight, bias,
    shortcut and whatever ``excite`` uses.

    backend: "auto" (:func:`batch_norm_relu_backend`'s choice), "triton" (the kernels of
    ``fastnl.kernels.bn_se_tail``: the normalised map x is never written; forward 4 passes over
    a map, backward 6, where plain PyTorch makes 7 and 12, and y and the output are kept for the
    backward, not x too; training mode, float32 / float16 / bfloat16, weight and bias given; the
    output and y's gradient in y's dtype and layout), or "reference" (plain PyTorch).

    shortcut_sink: with backend "triton", a ``fastnl._residual_conv.ShortcutSink`` that the
    shortcut's gradient is left in instead of returned to autograd, for the block's first
    convolution to add in (``fastnl._residual_conv.conv_with_shortcut``; the shortcut must be
    that convolution's input); other backends return it as usual.

    shortcut_norm: a :class:`ShortcutNorm`: the shortcut added is the training-mode BatchNorm
    of ``shortcut`` (``F.batch_norm(shortcut, *shortcut_norm, training=True)``). With backend
    "triton" its statistics take one read of the shortcut and the tail applies it as it reads
    the shortcut: the normalised shortcut is never written; its backward reads the shortcut once
    more in the tail's partial pass and makes the shortcut's gradient in one more pass (2
    passes forward and 3 backward fewer than a BatchNorm before the tail). Training mode only.
    """
    if backend not in BN_RELU_BACKENDS:
        raise ValueError(f"backend must be one of {BN_RELU_BACKENDS}, got {backend!r}")
    _check_map_and_shortcut("y", y, shortcut)
    if not callable(excite):
        raise TypeError(f"excite must be a function of the squeeze (the SE module's layers), got {type(excite).__name__}")
    _check_bn_vectors(y, running_mean, running_var, weight, bias, "y")
    _check_devices(("y", "shortcut"), (y, shortcut))
    if shortcut_norm is not None:
        if not isinstance(shortcut_norm, ShortcutNorm):
            raise TypeError(f"shortcut_norm must be a fastnl.ops.ShortcutNorm, got {type(shortcut_norm).__name__}")
        if not training:
            raise ValueError("shortcut_norm is a training-mode BatchNorm: in eval mode apply the shortcut's "
                             "BatchNorm before the op")
        _check_bn_vectors(shortcut, *shortcut_norm[:4], "shortcut")
    if backend == "auto":
        backend = batch_norm_relu_backend(y, training, weight, bias)
        if shortcut.dtype != y.dtype or (shortcut_norm is not None and batch_norm_relu_backend(
                shortcut, training, shortcut_norm.weight, shortcut_norm.bias) != backend):
            backend = "reference"
    if backend == "reference":
        if shortcut_norm is not None:
            shortcut = torch.nn.functional.batch_norm(shortcut, *shortcut_norm[:4], True, shortcut_norm.momentum,
                                                      shortcut_norm.eps)
        return reference.bn_se_residual_relu(y, running_mean, running_var, weight, bias, excite, shortcut, training,
                                             momentum, eps)
    _check_triton_bn(y, training, weight, bias, "y")
    _check_same(("y", "shortcut"), (y, shortcut))
    if shortcut_norm is not None:
        _check_triton_bn(shortcut, training, shortcut_norm.weight, shortcut_norm.bias, "shortcut")
    from fastnl import _bn_se_tail

    bn = _load_triton_kernels().batch_norm
    dense = [t if bn.dense_layout(t) else t.contiguous() for t in (y, shortcut)]
    z_bn = None if shortcut_norm is None else (shortcut_norm.weight, shortcut_norm.bias, shortcut_norm.eps)
    out, stats, z_stats = _bn_se_tail.bn_se_residual_relu(dense[0], weight, bias, eps, excite, dense[1],
                                                          shortcut_sink, z_bn)
    _update_running(running_mean, running_var, stats, momentum)
    if shortcut_norm is not None:
        _update_running(shortcut_norm.running_mean, shortcut_norm.running_var, z_stats, shortcut_norm.momentum)
    return out
