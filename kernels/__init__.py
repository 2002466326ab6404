"""Triton kernels of fastnl, installed as ``fastnl.kernels``; reached through :mod:`fastnl.ops`."""
from . import softmax_rows
from .nl_attention import nl_attention_triton

__all__ = ["nl_attention_triton", "softmax_rows"]
