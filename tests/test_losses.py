"""Eq. (7)-(9): cross-entropy + batch-hard triplet against explicit loops."""
import math

import torch

from fastnl.losses import BatchHardTripletLoss, ReIDLoss, euclidean_distances


def _triplet_by_loops(x, y, margin):
    total, count = 0.0, 0
    for a in range(len(y)):
        pos = [math.dist(x[a].tolist(), x[p].tolist()) for p in range(len(y)) if p != a and y[p] == y[a]]
        neg = [math.dist(x[a].tolist(), x[n].tolist()) for n in range(len(y)) if y[n] != y[a]]
        if pos and neg:
            total += max(0.0, margin + max(pos) - min(neg))
            count += 1
    return total / count


def test_euclidean_distances():
    x = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.cdist(x, x)
    torch.testing.assert_close(euclidean_distances(x), expected.clamp_min(1e-6), atol=1e-6, rtol=1e-9)


def test_batch_hard_triplet_matches_loops():
    torch.manual_seed(0)
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])  # id 4 has no positive: not an anchor
    for margin in (0.3, 5.0):
        loss = BatchHardTripletLoss(margin)(x, y)
        assert abs(loss.item() - _triplet_by_loops(x, y, margin)) < 1e-9


def test_triplet_zero_when_well_separated_and_no_positive_batch():
    x = torch.tensor([[0.0, 0], [0.1, 0], [10, 0], [10.1, 0]])
    assert BatchHardTripletLoss(0.3)(x, torch.tensor([0, 0, 1, 1])).item() == 0.0
    lone = BatchHardTripletLoss(0.3)(x, torch.tensor([0, 1, 2, 3]))
    assert lone.item() == 0.0


def test_reid_loss_is_ce_plus_triplet_and_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    total, parts = ReIDLoss()(logits, feats, y)
    logp = torch.log_softmax(logits.detach(), 1)
    ce = -logp[torch.arange(8), y].mean()
    assert abs(parts["ce"].item() - ce.item()) < 1e-6
    assert abs(parts["triplet"].item() - _triplet_by_loops(feats.detach(), y, 0.3)) < 1e-9
    assert abs(total.item() - (parts["ce"] + parts["triplet"]).item()) < 1e-12
    total.backward()
    assert logits.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    eps = 0.1
    _, smooth = ReIDLoss(label_smoothing=eps)(logits.detach(), feats.detach(), y)
    expected = ((1 - eps) * -logp[torch.arange(8), y] - eps * logp.mean(1)).mean()
    assert abs(smooth["ce"].item() - expected.item()) < 1e-6
