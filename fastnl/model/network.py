"""The paper's network: SE-ResNet50 with NLAMs after chosen blocks, NLTP or TP_avg, FC head."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastnl._running_stats import deferred_running_stats
from fastnl._weight_cast import call_with, cast_group, subgroup
from fastnl.errors import UserError
from fastnl.model.nlam import NLAM, backends_for
from fastnl.model.temporal import build_temporal

# "Blocks 1..5" of the paper: the stem and the four residual stages of SE-ResNet50.
BLOCK_CHANNELS = {1: 64, 2: 256, 3: 512, 4: 1024, 5: 2048}
DESCRIPTOR_DIM = 2048


def seresnet50() -> nn.Module:
    """timm's SE-ResNet50 without its classifier, randomly initialised (nothing downloaded)."""
    import timm

    return timm.create_model("seresnet50", pretrained=False, num_classes=0)


class _RecomputeKeepsBNStats:
    """Runs ``block``; every later call (the recomputation in backward under checkpointing)
    leaves the BatchNorm running statistics alone, so a checkpointed step updates them exactly
    once, as an uncheckpointed step does. The recomputation still normalises with the batch
    statistics and saves the same tensors, so its output and every gradient are those of the
    first call: only the momentum is 0 (running = 1 * running + 0 * batch) and the step counter
    is put back."""

    def __init__(self, block: nn.Module, casts: dict | None = None):
        self.block, self.casts, self.calls = block, casts or {}, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return call_with(self.block, self.casts, x)
        norms = [m for m in self.block.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            return call_with(self.block, self.casts, x)
        finally:
            # also when the recomputation stops early (torch's StopRecomputationError)
            with torch.no_grad():
                for m, (momentum, count) in zip(norms, saved):
                    m.momentum = momentum
                    m.num_batches_tracked.copy_(count)


class VideoReIDNet(nn.Module):
    """SE-ResNet50 + NLAM (after ``nlam_blocks``) + temporal aggregation + FC classifier.

    forward(clips [B, N, 3, H, W]): in training mode returns (logits [B, num_classes],
    descriptors [B, 2048]); in eval mode returns descriptors.
    """

    def __init__(self, num_classes: int, *, nlam_blocks: Iterable[int] = (4, 5),
                 temporal: str = "nltp", impl: str = "fused", nlam_scale: float = 1.0,
                 nlam_reduction: int = 16):
        super().__init__()
        backends_for(impl)
        blocks = tuple(sorted(set(int(b) for b in nlam_blocks)))
        bad = [b for b in blocks if b not in BLOCK_CHANNELS]
        if bad:
            raise ValueError(f"nlam_blocks must be a subset of 1..5, got {tuple(nlam_blocks)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.grad_checkpointing = False
        self.fused_stem = impl == "fused"  # bn1 + act1 of the stem as one op (see FusedStem)
        # under autocast, the weight casts of each stage / module in one group (fastnl._weight_cast)
        self.grouped_weight_casts = impl == "fused"
        # the fused BatchNorm ops' running-statistics updates and batch counts made when the
        # training forward ends, in a few launches (fastnl._running_stats)
        self.deferred_bn_stats = impl == "fused"
        self.backbone = seresnet50()
        if impl == "fused":  # the bottlenecks' SE rescale + residual + ReLU in one op
            from fastnl.model.se_bottleneck import fuse_se_tails

            fuse_se_tails(self.backbone)
            from fastnl import ops

            # the Triton kernels imported now, where Triton is installed: the first call may be
            # inside torch.compile's tracing, which cannot import a module
            ops._triton_available()
        self.nlam = nn.ModuleDict({
            str(b): NLAM(BLOCK_CHANNELS[b], reduction=nlam_reduction, scale=nlam_scale, impl=impl)
            for b in blocks
        })
        self.temporal = build_temporal(temporal, DESCRIPTOR_DIM, stacked_projections=impl == "fused")
        self.classifier = nn.Linear(DESCRIPTOR_DIM, num_classes)

    def stages(self) -> list[nn.Module]:
        bb = self.backbone
        if self.fused_stem:
            from fastnl.model.se_bottleneck import FusedStem

            stem = FusedStem(bb.conv1, bb.bn1, bb.act1, bb.maxpool)
        else:
            stem = nn.Sequential(bb.conv1, bb.bn1, bb.act1, bb.maxpool)
        return [stem, bb.layer1, bb.layer2, bb.layer3, bb.layer4]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the backbone in backward instead of keeping its activations: the stem and
        each residual block are checkpointed on their own, so only block inputs are kept and at
        most one block's activations are alive at a time during the recomputation."""
        self.grad_checkpointing = enabled

    def _cast_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The autocast dtype where this model makes autocast's weight casts per module group
        (:mod:`fastnl._weight_cast`: the fused model under autocast); None: autocast casts."""
        device = x.device.type
        if not self.grouped_weight_casts or torch.compiler.is_compiling() or not torch.is_autocast_enabled(device):
            return None
        return torch.get_autocast_dtype(device)

    @staticmethod
    def _casts(module: nn.Module, dtype: torch.dtype | None) -> dict:
        return {} if dtype is None else cast_group(module, dtype)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor, is_stem: bool, casts: dict) -> torch.Tensor:
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return call_with(stage, casts, x)
        blocks = [(stage, casts)] if is_stem else [(block, subgroup(casts, str(i))) for i, block in enumerate(stage)]
        for block, block_casts in blocks:
            x = checkpoint(_RecomputeKeepsBNStats(block, block_casts), x, use_reentrant=False)
        return x

    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips [B, N, 3, H, W] -> frame maps after block 5 (and the NLAMs) [B*N, 2048, h, w]."""
        b, n = clips.shape[:2]
        x = clips.reshape(b * n, *clips.shape[2:])
        dtype = self._cast_dtype(clips)
        for index, stage in enumerate(self.stages(), start=1):
            x = self._run_stage(stage, x, index == 1, self._casts(stage, dtype))
            key = str(index)
            if key in self.nlam:
                nlam = self.nlam[key]
                x = call_with(nlam, self._casts(nlam, dtype), x, n)
        return x

    def forward(self, clips: torch.Tensor):
        if clips.dim() != 5 or clips.shape[2] != 3:
            raise ValueError(f"clips must have shape [B, N, 3, H, W], got {tuple(clips.shape)}")
        n = clips.shape[1]
        dtype = self._cast_dtype(clips)
        with deferred_running_stats(self.deferred_bn_stats and self.training):
            features = self.frame_features(clips)
        descriptors = call_with(self.temporal, self._casts(self.temporal, dtype), features, n)
        if not self.training:
            return descriptors
        return call_with(self.classifier, self._casts(self.classifier, dtype), descriptors), descriptors


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"pretrained weights not found: {path} (give a local timm or torchvision state_dict file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read pretrained weights {path}: {err}") from err
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state_dict of tensors")
    return obj


def load_pretrained_backbone(backbone: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load ImageNet weights from a local timm/torchvision-style file into ``backbone``.

    Prefixes ``module.``/``backbone.`` are stripped and the ImageNet classifier (``fc.*``,
    ``classifier.*``, ``last_linear.*``) is dropped. Returns (missing, unexpected) keys.
    Raises UserError when no key matches or a matching key has the wrong shape.
    """
    path = Path(path)
    state = {}
    for key, value in _read_state_dict(path).items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.split(".")[0] in ("fc", "classifier", "last_linear"):
            continue
        state[key] = value
    own = backbone.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"pretrained weights {path} do not fit SE-ResNet50: " + "; ".join(wrong[:5]))
    if not set(state) & set(own):
        raise UserError(f"pretrained weights {path} share no key with SE-ResNet50 (is it a seresnet50 state_dict?)")
    result = backbone.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def build_model(num_classes: int, *, frames: int = 8, nlam_blocks: Iterable[int] = (4, 5),
                temporal: str = "nltp", impl: str = "fused", pretrained: str | Path | None = None,
                nlam_scale: float = 1.0, nlam_reduction: int = 16, verbose: bool = True) -> VideoReIDNet:
    """Build the paper's network (defaults: NLAM after blocks 4 and 5, NLTP, N = 8).

    ``impl="fused"`` runs the NLAM on :mod:`fastnl.ops` kernels, ``impl="reference"`` on plain
    PyTorch; both have the same parameters and state_dict keys. ``pretrained``: a local file of
    ImageNet SE-ResNet50 weights (nothing is downloaded); missing/unexpected keys are reported.
    The network takes clips of any N: ``frames`` (a config's N) changes nothing in it.
    """
    model = VideoReIDNet(num_classes, nlam_blocks=nlam_blocks, temporal=temporal,
                         impl=impl, nlam_scale=nlam_scale, nlam_reduction=nlam_reduction)
    if pretrained is not None:
        missing, unexpected = load_pretrained_backbone(model.backbone, pretrained)
        if verbose:
            print(f"loaded backbone weights from {pretrained}: {len(missing)} missing keys"
                  f"{' ' + str(missing[:5]) if missing else ''}, {len(unexpected)} unexpected keys"
                  f"{' ' + str(unexpected[:5]) if unexpected else ''}")
    return model
