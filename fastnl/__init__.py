"""fastnl: video person re-ID with non-local spatial and temporal attention (Liu et al. 2020).

Public entry points: :mod:`fastnl.ops` (fused kernels with a ``backend`` switch),
:mod:`fastnl.reference` (plain PyTorch versions), :func:`fastnl.model.build_model`.
"""

__version__ = "0.1.0"
