"""Triton kernels of fastnl, installed as ``fastnl.kernels``; reached through :mod:`fastnl.ops`."""
from . import batch_norm, bn_se_tail, se_excite, softmax_rows
from .nl_attention import nl_attention_triton

__all__ = ["batch_norm", "bn_se_tail", "nl_attention_triton", "se_excite", "softmax_rows"]
