"""One way to define an op with a backward op of its own as ``torch.library`` custom ops."""
from __future__ import annotations

import torch


def define_op_pair(name: str, forward, backward, schemas: tuple[str, str], fakes: tuple, autograd: tuple):
    """``fastnl::{name}`` (body ``forward``) and ``fastnl::{name}_backward`` (body ``backward``)
    with ``schemas`` (forward, backward) and fake implementations ``fakes`` (forward, backward);
    the forward's autograd is ``autograd`` = (backward rule, setup_context), the rule calling the
    backward op. Returns the two ops (``torch.library.CustomOpDef``)."""
    fwd = torch.library.custom_op(f"fastnl::{name}", forward, mutates_args=(), schema=schemas[0])
    bwd = torch.library.custom_op(f"fastnl::{name}_backward", backward, mutates_args=(), schema=schemas[1])
    fwd.register_fake(fakes[0])
    bwd.register_fake(fakes[1])
    rule, setup_context = autograd
    fwd.register_autograd(rule, setup_context=setup_context)
    return fwd, bwd


def define_op(name: str, body, schema: str, fake):
    """``fastnl::{name}`` (body ``body``, no autograd formula of its own) with ``schema`` and the
    fake implementation ``fake``. Returns the op (``torch.library.CustomOpDef``)."""
    op = torch.library.custom_op(f"fastnl::{name}", body, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op
