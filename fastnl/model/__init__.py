"""The paper's model: SE-ResNet50 + NLAM + NLTP (Liu et al. 2020, section 3)."""
from fastnl.model.network import BLOCK_CHANNELS, VideoReIDNet, build_model, load_pretrained_backbone
from fastnl.model.nlam import NLAM
from fastnl.model.temporal import NLTP, TemporalAvgPool

__all__ = ["BLOCK_CHANNELS", "NLAM", "NLTP", "TemporalAvgPool", "VideoReIDNet", "build_model",
           "load_pretrained_backbone"]
