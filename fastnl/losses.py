"""Training losses, paper eq. (7)-(9): softmax cross-entropy + batch-hard triplet."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances of the rows of x [B, D] -> [B, B] (float32 or wider)."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
    return d2.clamp_min(1e-12).sqrt()


class BatchHardTripletLoss(nn.Module):
    """Eq. (9) with batch-hard mining (Hermans et al.): for each anchor the farthest positive
    and the nearest negative in the batch, ``[m + D(a, p) - D(a, n)]_+``, averaged over the
    anchors that have both a positive and a negative (the usual normalisation of eq. 9's sum)."""

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dist = euclidean_distances(features)
        same = targets[:, None] == targets[None, :]
        eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
        pos_mask, neg_mask = same & ~eye, ~same
        valid = pos_mask.any(1) & neg_mask.any(1)
        if not valid.any():
            return dist.sum() * 0.0
        hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
        hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(1)
        loss = F.relu(self.margin + hardest_pos - hardest_neg)
        return loss[valid].mean()


class ReIDLoss(nn.Module):
    """Eq. (7): ``L = L_softmax + L_triplet`` on (logits, descriptors, pids).

    forward returns (total loss, {"ce": ..., "triplet": ...}) with detached parts.
    """

    def __init__(self, margin: float = 0.3, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.triplet = BatchHardTripletLoss(margin)

    def forward(self, logits: torch.Tensor, descriptors: torch.Tensor, targets: torch.Tensor):
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        tri = self.triplet(descriptors, targets)
        return ce + tri, {"ce": ce.detach(), "triplet": tri.detach()}
