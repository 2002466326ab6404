"""Autocast's weight casts made per group of modules: two kernels for a stage, not two per weight.

Under autocast every convolution and linear layer casts its float32 weight and bias to the
autocast dtype (one kernel each in the forward) and its backward casts their gradients back
(one kernel each): in SE-ResNet50 with two NLAMs and NLTP some 140 tensors, about 290 kernels
a training step, nearly all shorter than a kernel launch. :func:`cast_group` makes the casts of
a whole group of modules (a residual stage, an NLAM) with ``torch._foreach_copy_``, which on
CUDA copies up to 64 tensors of mixed dtypes per kernel, and its backward casts the group's
gradients the same way. The values are autocast's to the bit (a cast is a cast): the modules
then run on the cast tensors (:func:`call_with`, through ``torch.func.functional_call``) and
autocast, finding them already in its dtype, casts nothing.

The gradients of a group reach its parameters when the whole group's backward is done (a
stage's, not each layer's): DDP's all-reduce of a stage starts after that stage, not layer by
layer.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

# the layers whose forward autocast casts: conv / linear on their own weight and bias
_CAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _eligible(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether autocast would cast ``t`` to ``dtype`` (floating point, not float64: autocast's rule)."""
    return t is not None and t.is_floating_point() and t.dtype not in (torch.float64, dtype)


def cast_targets(module: nn.Module, dtype: torch.dtype) -> list:
    """(name, tensor) for every weight and bias that autocast to ``dtype`` would cast in
    ``module``'s conv and linear layers, names relative to ``module``. A module's
    ``outside_autocast`` (names of its children) keeps those children out: layers whose
    weights an op consumes without autocast (the NLAM's channel-attention MLP)."""
    found = []

    def walk(m: nn.Module, prefix: str) -> None:
        if isinstance(m, _CAST_LAYERS):
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and _eligible(t, dtype):
                    found.append((prefix + name, t))
        skip = set(getattr(m, "outside_autocast", ()))
        for child_name, child in m.named_children():
            if child_name not in skip:
                walk(child, f"{prefix}{child_name}.")

    walk(module, "")
    return found


class _CastGroup(torch.autograd.Function):
    """(dtype, *tensors) -> the tensors cast to dtype (layouts kept); backward: the gradients
    cast back to each tensor's dtype and layout. One ``_foreach_copy_`` each way."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(out, list(tensors))
        ctx.layouts = [(t.shape, t.stride(), t.dtype) for t in tensors]
        ctx.set_materialize_grads(False)  # an unused output: no gradient, as under autocast
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        result = [None] * len(grads)
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[i + 1]]
        if wanted:
            dst = []
            for i in wanted:
                shape, stride, dtype = ctx.layouts[i]
                dst.append(torch.empty_strided(shape, stride, dtype=dtype, device=grads[i].device))
            torch._foreach_copy_(dst, [grads[i] for i in wanted])
            for i, d in zip(wanted, dst):
                result[i] = d
        return (None, *result)


def cast_group(module: nn.Module, dtype: torch.dtype) -> dict:
    """{name: tensor cast to ``dtype``} for :func:`cast_targets` of ``module``, made in one
    group (differentiable: the gradients go back to the originals, cast to their dtype)."""
    if not dtype.is_floating_point or dtype == torch.float64:
        raise ValueError(f"cast_group: expected a reduced floating dtype (autocast's), got {dtype}")
    targets = cast_targets(module, dtype)
    if not targets:
        return {}
    names = [name for name, _ in targets]
    cast = _CastGroup.apply(dtype, *(t for _, t in targets))
    return dict(zip(names, cast))


def subgroup(casts: dict, prefix: str) -> dict:
    """The entries of ``casts`` under the child ``prefix`` (e.g. "0"), named relative to it."""
    lead = prefix + "."
    return {name[len(lead):]: t for name, t in casts.items() if name.startswith(lead)}


def call_with(module: nn.Module, casts: dict, *args):
    """``module(*args)`` with the tensors of ``casts`` in place of its own (``{}``: as it is)."""
    if not casts:
        return module(*args)
    return torch.func.functional_call(module, casts, args, tie_weights=False, strict=False)
