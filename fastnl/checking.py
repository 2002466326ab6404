"""Every fused op of fastnl against the plain PyTorch reference (``fastnl check``).

Each check runs the same random inputs three ways: the fused op in the tested dtype, the
reference in the tested dtype, and the reference in float64 on the same (rounded) inputs. The
error of the fused op is measured against the float64 run, and its tolerance is derived from the
reference's own error in that dtype (as in the flash-attention tests):

    max |fused - ref64| <= FACTOR * max |ref_lowp - ref64| + FLOOR_ULPS * eps(dtype) * max |ref64|

for the forward outputs and, separately, for the gradients of every input and parameter under a
fixed random upstream gradient. ``max |ref64|`` is taken over the tensor's group (the inputs of
an op, the parameters of one module), so a gradient that is zero in exact arithmetic is judged
at the scale of its siblings.

An element-wise maximum alone says little about a whole tensor (one near-zero gradient entry
divided by itself gives a "relative error" of 1e7), so every tensor is also measured norm-wise,
with its tolerance from the same measure:

    ||fused - ref64|| / n  <=  FACTOR * ||ref_lowp - ref64|| / n + FLOOR_ULPS * eps(dtype)

where n = max(||ref64||, the norm a tensor of its size has at its group's RMS magnitude). A
tensor passes when both inequalities hold. A row reports the tensor with the worst
error/tolerance ratio (of either measure): its max abs error and tolerance, and its norm-wise
relative error and tolerance.

For the attention the low-precision reference is the plain computation kept in the tested dtype
(as flash-attention's tests do); for the other ops it is ``fastnl.reference`` itself. For NLAM
and the model "dtype" is the autocast dtype (float32 = no autocast) and the weights stay float32,
as in training; for the single ops the inputs themselves are cast.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastnl import runtime
from fastnl.vocabulary import TRITON_BACKENDS, triton_interpreted

FACTOR = 4.0
FLOOR_ULPS = 2.0
OPS = ("attention", "channel", "se", "bn", "nlam", "model")
SIZES = ("tiny", "small", "real")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Unavailable(Exception):
    """The backend of a check cannot run here (its reason is shown in the SKIP row)."""


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    status: str  # PASS, FAIL or SKIP
    max_abs: float = float("nan")
    max_rel: float = float("nan")  # max_abs over the group's max |float64| (not shown in the table)
    tol: float = float("nan")  # the tolerance of max_abs
    norm_rel: float = float("nan")  # ||fused - float64|| / ||float64||, of the same tensor
    norm_tol: float = float("nan")  # its tolerance
    worst: str = ""  # which output or gradient gave the row's numbers
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Check:
    """One op at one shape. ``run(variant, dtype, seed)`` returns ({name: output}, {name: grad})
    for variant "fused", "lowp" (reference in dtype) or "ref64" (reference in float64)."""

    op: str
    shape: str
    run: Callable[[str, torch.dtype, int], tuple[dict, dict]]
    available: Callable[[], str | None] = lambda: None
    note: Callable[[torch.dtype], str] = lambda dtype: ""  # a note on the dtype's rows
    dtypes: tuple = field(default_factory=tuple)  # empty: every requested dtype


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def tolerance(ref_err: float, scale: float, dtype: torch.dtype) -> float:
    """The allowed max abs error for a result whose float64 magnitude is ``scale``."""
    return FACTOR * ref_err + FLOOR_ULPS * torch.finfo(dtype).eps * scale


def _group(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


@dataclass
class Comparison:
    """The worst tensor of a comparison: element-wise (``max_abs`` vs ``tol``) and norm-wise
    (``norm_rel`` vs ``norm_tol``) errors against float64; ``max_rel`` is ``max_abs`` over the
    group's max |ref64|."""

    passed: bool
    max_abs: float
    max_rel: float
    tol: float
    worst: str
    norm_rel: float
    norm_tol: float


def norm_tolerance(ref_rel: float, dtype: torch.dtype) -> float:
    """The allowed norm-wise relative error when the reference in ``dtype`` has ``ref_rel``."""
    return FACTOR * ref_rel + FLOOR_ULPS * torch.finfo(dtype).eps


def compare(fused: dict, lowp: dict, ref64: dict, dtype: torch.dtype) -> Comparison:
    """The worst tensor of ``fused`` against ``ref64``, with tolerances from ``lowp``'s error.

    The floor of a tensor's tolerance scales with the largest magnitude among the tensors of its
    group (the parameters of one module, e.g. a conv's weight and bias; the inputs of an op): a
    gradient that is zero in exact arithmetic (a bias followed by a BatchNorm) is rounding noise
    at the scale of its siblings, not at its own. The norm-wise measure divides by the larger of
    the tensor's norm and the norm it would have at its group's RMS magnitude, for the same reason.
    """
    worst, worst_ratio = Comparison(True, 0.0, 0.0, 0.0, "", 0.0, 0.0), -1.0
    group_scale: dict = {}
    group_sq: dict = {}
    for name, exact in ref64.items():
        g = _group(name)
        exact = exact.detach().double()
        top = exact.abs().max().item() if exact.numel() else 0.0
        group_scale[g] = max(group_scale.get(g, 0.0), top)
        sq, n = group_sq.get(g, (0.0, 0))
        group_sq[g] = (sq + exact.square().sum().item(), n + exact.numel())
    for name, exact in ref64.items():
        exact = exact.detach().double()
        got = fused[name].detach().double()
        base = lowp[name].detach().double()
        g = _group(name)
        scale = group_scale[g]
        if not torch.isfinite(got).all():
            return Comparison(False, float("inf"), float("inf"), tolerance(0.0, scale, dtype), name,
                              float("inf"), norm_tolerance(0.0, dtype))
        err = (got - exact).abs().max().item() if exact.numel() else 0.0
        ref_err = (base - exact).abs().max().item() if exact.numel() else 0.0
        tol = tolerance(ref_err, scale, dtype)
        sq, n = group_sq[g]
        rms = math.sqrt(sq / n) if n else 0.0
        denom = max(exact.norm().item(), rms * math.sqrt(exact.numel()))
        if denom > 0:
            norm_rel = (got - exact).norm().item() / denom
            ref_rel = (base - exact).norm().item() / denom
        else:  # every tensor of the group is exactly zero
            norm_rel = 0.0 if err == 0 else float("inf")
            ref_rel = 0.0
        norm_tol = norm_tolerance(ref_rel, dtype)
        ratio = max(err / tol if tol > 0 else (0.0 if err == 0 else float("inf")), norm_rel / norm_tol)
        if ratio > worst_ratio:
            worst_ratio = ratio
            worst = Comparison(err <= tol and norm_rel <= norm_tol, err, err / scale if scale > 0 else 0.0, tol,
                               name, norm_rel, norm_tol)
    return worst


def _grads(outputs: dict, inputs: dict, seed: int) -> dict:
    """Gradients of sum(out * g) for fixed random g (float64, drawn from ``seed``) w.r.t. inputs."""
    gen = torch.Generator().manual_seed(seed + 1)
    loss = 0.0
    for out in outputs.values():
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
        loss = loss + (out.double() * g).sum()
    names = list(inputs)
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(inputs[n])) for n, g in zip(names, grads)}


def _randn(shape, seed: int, device: str, std: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(device)


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def _triton_reason(device: str) -> str | None:
    if device == "cpu" and not triton_interpreted():
        return "the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before fastnl is imported"
    try:
        from fastnl._paths import import_kernels

        import_kernels()
    except ImportError as err:
        return f"Triton kernels unavailable: {err}"
    return None


def _extension_reason() -> str | None:
    from fastnl import _extension

    if _extension.available():
        return None
    return f"extension not built: {_extension._state.get('error', 'unknown reason')}"


def _autocast(device: str, dtype: torch.dtype, variant: str):
    """The model dtype as autocast: float32 and the float64 reference run without it."""
    return runtime.autocast(device, None if variant == "ref64" or dtype == torch.float32 else dtype)


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def _attention_lowp(q, k, v, scale):
    """The plain computation kept in the inputs' dtype (no upcast): the low-precision baseline."""
    p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1)
    return torch.bmm(p, v)


def attention_check(backend: str, batch: int, length: int, dim: int, device: str, scale: float = 1.0) -> Check:
    """nl_attention on q, k, v read as strided views of one [B, 3D, L] tensor (the model's layout)."""
    from fastnl import ops, reference

    def run(variant, dtype, seed):
        # logits of standard deviation ~2: a softmax as peaked as a trained NLAM's
        base = _randn((batch, 3 * dim, length), seed, device, std=1.4 * dim ** -0.25)
        base = base.to(dtype).to(torch.float64 if variant == "ref64" else dtype).requires_grad_(True)
        q, k, v = (base[:, i * dim:(i + 1) * dim].transpose(1, 2) for i in range(3))
        if variant == "fused":
            out = ops.nl_attention(q, k, v, scale=scale, backend=backend)
        elif variant == "lowp":
            out = _attention_lowp(q, k, v, scale)
        else:
            out = reference.nl_attention(q, k, v, scale)
        outs = {"out": out}
        g = _grads(outs, {"qkv": base}, seed)["qkv"]
        return outs, {"dq": g[:, :dim], "dk": g[:, dim:2 * dim], "dv": g[:, 2 * dim:]}

    available = (lambda: _triton_reason(device)) if backend in TRITON_BACKENDS else (lambda: None)
    return Check(f"nl_attention[{backend}]", f"B={batch} L={length} D={dim}", run, available)


def channel_check(batch: int, frames: int, channels: int, height: int, width: int, device: str,
                  reduction: int = 16) -> Check:
    from fastnl import ops, reference

    hidden = max(1, channels // reduction)

    def run(variant, dtype, seed):
        x = _randn((batch, frames, channels, height, width), seed, device)
        params = {
            "w1": _randn((hidden, channels), seed + 2, device, std=channels ** -0.5),
            "b1": _randn((hidden,), seed + 3, device, std=0.1),
            "w2": _randn((channels, hidden), seed + 4, device, std=hidden ** -0.5),
            "b2": _randn((channels,), seed + 5, device, std=0.1),
        }
        wide = torch.float64 if variant == "ref64" else torch.float32
        x = x.to(dtype).to(torch.float64 if variant == "ref64" else dtype).requires_grad_(True)
        params = {n: p.to(wide).requires_grad_(True) for n, p in params.items()}
        if variant == "fused":
            out = ops.channel_attention(x, *params.values(), backend="extension")
        else:
            out = reference.channel_attention(x, *params.values())
        outs = {"out": out}
        return outs, _grads(outs, {"x": x, **params}, seed)

    return Check("channel_attention[extension]", f"x=[{batch},{frames},{channels},{height},{width}] R={hidden}",
                 run, _extension_reason)


def se_check(batch: int, channels: int, height: int, width: int, device: str) -> Check:
    """The SE bottleneck tail relu(x * gate + shortcut) on the extension, gate as the SE module's
    sigmoid gives it (in the model dtype)."""
    from fastnl import ops, reference

    def run(variant, dtype, seed):
        to = torch.float64 if variant == "ref64" else dtype
        x = _randn((batch, channels, height, width), seed, device).to(dtype).to(to).requires_grad_(True)
        shortcut = _randn((batch, channels, height, width), seed + 1, device).to(dtype).to(to).requires_grad_(True)
        gate = torch.sigmoid(_randn((batch, channels), seed + 2, device, std=2.0)).to(dtype).to(to).requires_grad_(True)
        if variant == "fused":
            out = ops.se_residual_relu(x, gate, shortcut, backend="extension")
        else:
            out = reference.se_residual_relu(x, gate, shortcut)
        outs = {"out": out}
        return outs, _grads(outs, {"x": x, "gate": gate, "shortcut": shortcut}, seed)

    return Check("se_residual_relu[extension]", f"x=[{batch},{channels},{height},{width}]", run, _extension_reason)


def bn_relu_check(batch: int, channels: int, height: int, width: int, device: str) -> Check:
    """relu(batch_norm(x)) in training mode on the Triton kernels: x in the model dtype (a
    convolution's output under autocast), the affine weight and bias in float32."""
    from fastnl import ops, reference

    def run(variant, dtype, seed):
        to = torch.float64 if variant == "ref64" else dtype
        wide = torch.float64 if variant == "ref64" else torch.float32
        x = (0.3 + _randn((batch, channels, height, width), seed, device)).to(dtype).to(to).requires_grad_(True)
        weight = _randn((channels,), seed + 1, device).to(wide).requires_grad_(True)
        bias = _randn((channels,), seed + 2, device, std=0.5).to(wide).requires_grad_(True)
        if variant == "fused":
            out = ops.batch_norm_relu(x, None, None, weight, bias, training=True, backend="triton")
        else:
            out = reference.batch_norm_relu(x, None, None, weight, bias, True, 0.1, 1e-5)
        outs = {"out": out}
        return outs, _grads(outs, {"x": x, "bn.weight": weight, "bn.bias": bias}, seed)

    return Check("batch_norm_relu[triton]", f"x=[{batch},{channels},{height},{width}]", run,
                 lambda: _triton_reason(device))


def bn_se_check(batch: int, channels: int, height: int, width: int, device: str,
                shortcut_norm: bool = False) -> Check:
    """A bottleneck's end from its last convolution's output y on the Triton kernels:
    relu(x * excite(mean_hw(x)) + shortcut), x = batch_norm(y) in training mode; y and the
    shortcut in the model dtype, the BatchNorm's and the SE module's parameters in float32, the
    SE convolutions in the maps' dtype (as autocast runs them). ``shortcut_norm``: a
    downsampling block's end, the shortcut the training-mode BatchNorm of its convolution's
    output, applied in the op (:class:`fastnl.ops.ShortcutNorm`)."""
    from fastnl import ops, reference

    hidden = max(1, channels // 16)

    def run(variant, dtype, seed):
        to = torch.float64 if variant == "ref64" else dtype
        wide = torch.float64 if variant == "ref64" else torch.float32
        y = (0.3 + _randn((batch, channels, height, width), seed, device)).to(dtype).to(to).requires_grad_(True)
        shortcut = _randn((batch, channels, height, width), seed + 1, device).to(dtype).to(to).requires_grad_(True)
        params = {
            "bn.weight": _randn((channels,), seed + 2, device),
            "bn.bias": _randn((channels,), seed + 3, device, std=0.5),
            "fc1.weight": _randn((hidden, channels, 1, 1), seed + 4, device, std=channels ** -0.5),
            "fc1.bias": 0.5 + _randn((hidden,), seed + 5, device, std=0.1),
            "fc2.weight": _randn((channels, hidden, 1, 1), seed + 6, device, std=2 * hidden ** -0.5),
            "fc2.bias": _randn((channels,), seed + 7, device, std=0.1),
        }
        if shortcut_norm:
            params["shortcut_bn.weight"] = _randn((channels,), seed + 8, device)
            params["shortcut_bn.bias"] = _randn((channels,), seed + 9, device, std=0.5)
        params = {n: p.to(wide).requires_grad_(True) for n, p in params.items()}
        norm = None
        if shortcut_norm:
            norm = ops.ShortcutNorm(None, None, params["shortcut_bn.weight"], params["shortcut_bn.bias"])

        excite = reference.se_excitation(*(params[n] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))
        weight, bias = params["bn.weight"], params["bn.bias"]
        if variant == "fused":
            out = ops.bn_se_residual_relu(y, None, None, weight, bias, excite, shortcut, training=True,
                                          backend="triton", shortcut_norm=norm)
        else:
            added = shortcut if norm is None else torch.nn.functional.batch_norm(
                shortcut, None, None, norm.weight, norm.bias, True, 0.1, 1e-5)
            out = reference.bn_se_residual_relu(y, None, None, weight, bias, excite, added, True, 0.1, 1e-5)
        outs = {"out": out}
        return outs, _grads(outs, {"y": y, "shortcut": shortcut, **params}, seed)

    name = "bn_se_residual_relu[triton,shortcut_norm]" if shortcut_norm else "bn_se_residual_relu[triton]"
    return Check(name, f"y=[{batch},{channels},{height},{width}] R={hidden}", run, lambda: _triton_reason(device))


def se_excite_check(batch: int, channels: int, device: str) -> Check:
    """The SE module's excitation on the Triton kernels, sigmoid(fc2(relu(fc1(s)))) on an
    [N, C] squeeze, R = C / 16 (half precision only: float32 runs the module's layers)."""
    from timm.layers import SEModule

    from fastnl import _se_excite

    hidden = max(1, channels // 16)

    def run(variant, dtype, seed):
        torch.manual_seed(seed)
        se = SEModule(channels, rd_channels=hidden).to(device)
        with torch.no_grad():
            se.fc1.bias.add_(0.2)  # most reduced units on
        se = se.to(torch.float64 if variant == "ref64" else dtype)
        squeeze = _randn((batch, channels, 1, 1), seed + 1, device).to(dtype)
        squeeze = squeeze.to(torch.float64 if variant == "ref64" else dtype).requires_grad_(True)
        if variant == "fused":
            gate = _se_excite.excite(se, squeeze)
        else:
            gate = se.gate(se.fc2(se.act(se.fc1(squeeze))))
        outs = {"gate": gate}
        return outs, _grads(outs, {"squeeze": squeeze, **{f"se.{n}": p for n, p in se.named_parameters()}}, seed)

    return Check("se_excitation[triton]", f"s=[{batch},{channels}] R={hidden}", run, lambda: _triton_reason(device),
                 dtypes=(torch.float16, torch.bfloat16))


def _randomise_zero_init(module: torch.nn.Module, seed: int) -> None:
    """Give the zero-initialised BatchNorms after W0 (NLAM) and W (NLTP) random affine weights,
    so the non-local branches contribute to the output under test."""
    gen = torch.Generator().manual_seed(seed)
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d) and name.rsplit(".", 1)[-1] in ("w0_bn", "w_bn"):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


# NLAM and model checks scale the logits by this / sqrt(C'): with random weights and the paper's
# scale 1 the softmax saturates, its gradient is pure cancellation and checks nothing.
_SOFT_SCALE = 1.0


def _module_variants(build: Callable[[str], torch.nn.Module], device: str, seed: int) -> dict:
    """{"fused", "lowp", "ref64"} copies of one randomly initialised module, same weights."""
    torch.manual_seed(seed)
    fused = build("fused")
    _randomise_zero_init(fused, seed)
    reference = build("reference")
    reference.load_state_dict(fused.state_dict())
    return {"fused": fused.to(device).train(), "lowp": reference.to(device).train(),
            "ref64": copy.deepcopy(reference).double().to(device).train()}


def nlam_check(batch: int, frames: int, channels: int, height: int, width: int, device: str) -> Check:
    from fastnl.model import NLAM

    cache: dict = {}

    def run(variant, dtype, seed):
        if cache.get("seed") != seed:
            cache.clear()
            cache.update(seed=seed, modules=_module_variants(
                lambda impl: NLAM(channels, impl=impl, scale=_SOFT_SCALE * (channels // 2) ** -0.5), device, seed))
        module = cache["modules"][variant]  # train-mode outputs do not depend on the running stats
        wide = torch.float64 if variant == "ref64" else torch.float32
        x = _randn((batch * frames, channels, height, width), seed, device).to(wide).requires_grad_(True)
        with _autocast(device, dtype, variant):
            out = module(x, frames)
        outs = {"out": out}
        return outs, _grads(outs, {"x": x, **dict(module.named_parameters())}, seed)

    return Check("NLAM[fused]", f"x=[{batch}*{frames},{channels},{height},{width}]", run,
                 note=lambda dtype: _fused_backends(device))


def _fused_backends(device: str) -> str:
    """Which kernels ``impl="fused"`` runs on ``device`` (the "auto" backends of fastnl.ops)."""
    triton = device.startswith("cuda") and _triton_reason(device) is None
    channel = "extension" if _extension_reason() is None else "reference (extension not built)"
    return (f"attention {'triton' if triton else 'torch'}, channel and SE tail {channel}, "
            f"BatchNorm + ReLU and bottleneck end {'triton' if triton else 'reference'}")


def model_check(batch: int, frames: int, height: int, width: int, device: str, num_classes: int = 8) -> Check:
    from fastnl.model import build_model

    cache: dict = {}

    def run(variant, dtype, seed):
        if cache.get("seed") != seed:
            cache.clear()
            cache.update(seed=seed, modules=_module_variants(
                lambda impl: build_model(num_classes, frames=frames, impl=impl, verbose=False,
                                         nlam_scale=_SOFT_SCALE * 512 ** -0.5), device, seed))
        model = cache["modules"][variant]
        wide = torch.float64 if variant == "ref64" else torch.float32
        clips = _randn((batch, frames, 3, height, width), seed, device).to(wide)
        with _without_onednn_half(device, dtype), _autocast(device, dtype, variant):
            logits, descriptors = model(clips)
        outs = {"logits": logits, "descriptors": descriptors}
        with _without_onednn_half(device, dtype):
            return outs, _grads(outs, dict(model.named_parameters()), seed)

    def note(dtype):
        extra = f"; {_ONEDNN_NOTE}" if _onednn_off(device, dtype) else ""
        return _fused_backends(device) + extra

    return Check("model[fused]", f"clips=[{batch},{frames},3,{height},{width}]", run, note=note)


# torch 2.14's oneDNN bf16 convolution backward reads memory it did not write at the 2x1 maps
# that a 64x32 input gives layer4's strided convolution: its gradients then depend on what the
# heap held (non-finite after NaN garbage; any allocation pattern changes them). The model
# check's half-precision rows on a CPU therefore run the convolutions on ATen's own kernels.
_ONEDNN_NOTE = "half-precision CPU convolutions without oneDNN (its bf16 backward reads unwritten memory at 2x1 maps)"


def _onednn_off(device: str, dtype: torch.dtype) -> bool:
    """Whether the model check's rows in ``dtype`` on ``device`` run without oneDNN."""
    return not device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def _without_onednn_half(device: str, dtype: torch.dtype):
    if not _onednn_off(device, dtype):
        yield
        return
    # (torch.backends.mkldnn.flags would also reset oneDNN's TF32 flag, with a warning)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


# --------------------------------------------------------------------------------------------
# Shapes and the run
# --------------------------------------------------------------------------------------------


def build_checks(device: str, size: str, ops: tuple = OPS) -> list[Check]:
    """The checks at the paper's shapes ("real": layer3 L=8*16*8, D=512 and layer4 L=8*8*4,
    D=1024 at 256x128, N=8) or scaled down for a CPU ("small") or for tests ("tiny")."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    checks = []
    if "attention" in ops:
        if size == "real":
            # N=8 after layer3 and layer4, and a 32-frame clip after layer3 (several key blocks)
            real = [(2, 8 * 16 * 8, 512), (2, 8 * 8 * 4, 1024), (1, 32 * 16 * 8, 512)]
            shapes = {"triton": real, "chunked": real, "torch": real}
        elif size == "small":  # the interpreter runs ~1e6 times slower than a GPU: keep it tiny
            shapes = {"triton": [(1, 96, 32)], "chunked": [(1, 160, 32)], "torch": [(1, 1280, 64)]}
        else:
            shapes = {"triton": [(1, 40, 16)], "chunked": [(1, 40, 16)], "torch": [(1, 48, 16)]}
        for backend, dims in shapes.items():
            checks += [attention_check(backend, *d, device) for d in dims]
    if "channel" in ops:
        dims = {"real": [(2, 8, 1024, 16, 8), (2, 8, 2048, 8, 4)], "small": [(2, 4, 128, 8, 4)],
                "tiny": [(2, 3, 32, 4, 2)]}[size]
        checks += [channel_check(*d, device) for d in dims]
    if "se" in ops:
        # the last block of layer1 and of layer4 at 256x128 (8 frames of 2 clips), scaled down
        dims = {"real": [(16, 256, 64, 32), (16, 2048, 8, 4)], "small": [(8, 256, 16, 8)],
                "tiny": [(4, 24, 5, 3)]}[size]
        checks += [se_check(*d, device) for d in dims]
    if "bn" in ops:
        # the first BatchNorm + ReLU of a layer1 and of a layer3 block at 256x128 (16 frames)
        dims = {"real": [(16, 64, 64, 32), (16, 256, 16, 8)], "small": [(8, 64, 16, 8)],
                "tiny": [(3, 6, 5, 3)]}[size]
        checks += [bn_relu_check(*d, device) for d in dims]
        # the end of the last block of layer1 and of layer4 at 256x128 (16 frames), scaled down
        dims = {"real": [(16, 256, 64, 32), (16, 2048, 8, 4)], "small": [(8, 256, 16, 8)],
                "tiny": [(3, 20, 5, 3)]}[size]
        checks += [bn_se_check(*d, device) for d in dims]
        checks.append(bn_se_check(*dims[0], device, shortcut_norm=True))  # a downsampling block's end
        # the SE excitation of layer1's and layer4's ends (N = 16 frames, or scaled down)
        se_dims = {"real": [(16, 256), (16, 2048)], "small": [(8, 256)], "tiny": [(3, 40)]}[size]
        checks += [se_excite_check(*d, device) for d in se_dims]
    if "nlam" in ops:
        dims = {"real": [(2, 8, 1024, 16, 8), (2, 8, 2048, 8, 4)], "small": [(2, 4, 128, 8, 4)],
                "tiny": [(2, 2, 32, 4, 2)]}[size]
        checks += [nlam_check(*d, device) for d in dims]
    if "model" in ops:
        # two clips at least: with one, BatchNorm (train mode) makes the NLTP branch's contribution to
        # the clip descriptor a constant, and its gradients pure rounding noise
        dims = {"real": (2, 8, 256, 128), "small": (2, 4, 64, 32), "tiny": (2, 2, 64, 32)}[size]
        checks.append(model_check(*dims, device))
    return checks


def run_check(check: Check, dtype: torch.dtype, seed: int = 0) -> list[Result]:
    """Two rows (forward, gradients) for one check in one dtype."""
    dname = str(dtype).replace("torch.", "")
    rows = [f"{check.op} fwd", f"{check.op} grad"]
    reason = check.available()
    if reason is not None:
        return [Result(op, check.shape, dname, "SKIP", note=reason) for op in rows]
    try:
        exact = check.run("ref64", dtype, seed)
        lowp = check.run("lowp", dtype, seed)
        fused = check.run("fused", dtype, seed)
    except Unavailable as err:
        return [Result(op, check.shape, dname, "SKIP", note=str(err)) for op in rows]
    except Exception as err:  # a crash of the op under test is a failure, shown in one line
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return [Result(op, check.shape, dname, "FAIL", note=msg) for op in rows]
    results, note = [], check.note(dtype)
    for op, part in zip(rows, range(2)):
        c = compare(fused[part], lowp[part], exact[part], dtype)
        results.append(Result(op, check.shape, dname, "PASS" if c.passed else "FAIL", c.max_abs, c.max_rel, c.tol,
                              c.norm_rel, c.norm_tol, c.worst, note))
    return results


def run_all(device: str, dtypes, size: str, ops: tuple = OPS, seed: int = 0,
            progress: Callable[[Result], None] | None = None) -> list[Result]:
    results = []
    for check in build_checks(device, size, ops):
        for dtype in dtypes:
            if check.dtypes and dtype not in check.dtypes:
                continue
            for result in run_check(check, dtype, seed):
                results.append(result)
                if progress:
                    progress(result)
    return results


COLUMNS = (("op", "op", 46), ("shape", "shape", 34), ("dtype", "dtype", 8), ("max_abs", "max abs err", 11),
           ("tol", "tolerance", 10), ("norm_rel", "norm rel err", 12), ("norm_tol", "tolerance", 10),
           ("status", "result", 6))


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2e}"
    return str(value)


def format_header() -> str:
    return "  ".join(title.ljust(width) for _, title, width in COLUMNS)


def format_row(r: Result) -> str:
    line = "  ".join(_fmt(getattr(r, key)).ljust(width) for key, _, width in COLUMNS)
    extra = [f"worst: {r.worst}"] if r.worst else []
    extra += [r.note] if r.note else []
    return f"{line}  {'; '.join(extra)}".rstrip()


def print_table(results, file=sys.stdout) -> None:
    print(format_header(), file=file)
    for r in results:
        print(format_row(r), file=file)
