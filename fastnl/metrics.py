"""Re-ID metrics: chunked L2 distances, CMC and mAP under the Market-1501/MARS protocol.

The protocol (as in torchreid's ``metrics/rank.py``): for each query, gallery entries with the
same identity *and* the same camera are ignored (they are the same tracklet seen again, not a
re-identification); a query with no correct match left in the gallery is skipped. Ties in the
distance are broken by gallery order (a stable sort), so results do not depend on the sort
algorithm.
"""
from __future__ import annotations

import numpy as np
import torch


def l2_distances(queries: torch.Tensor, gallery: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """Euclidean distances [Q, G] between the rows of queries [Q, D] and gallery [G, D].

    Computed as ``sqrt(|q|^2 + |g|^2 - 2 q.g)`` one block of ``chunk_size`` queries at a time
    in float32, so the extra memory is ``chunk_size x G`` and never ``Q x G x D``.
    """
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries [Q, D] and gallery [G, D] must share D, got {tuple(queries.shape)} "
                         f"and {tuple(gallery.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    queries, gallery = queries.float(), gallery.float()
    g_sq = (gallery * gallery).sum(1)
    out = torch.empty(queries.shape[0], gallery.shape[0], dtype=torch.float32, device=queries.device)
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size]
        d2 = (q * q).sum(1, keepdim=True) + g_sq[None, :] - 2.0 * (q @ gallery.t())
        out[start:start + chunk_size] = d2.clamp_min_(0.0).sqrt_()
    return out


def _as_array(name: str, x, length: int | None = None) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1 or (length is not None and len(a) != length):
        want = f"[{length}]" if length is not None else "1-d"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    return a


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """CMC and mAP of a query x gallery distance matrix (smaller = more similar).

    distmat: [Q, G] (numpy or torch); q_pids, q_camids: [Q]; g_pids, g_camids: [G].
    Returns (cmc: float numpy array [max_rank], cmc[k-1] = fraction of the evaluated queries
    with a correct match within the top k; mAP: float), both in [0, 1]. Gallery entries with
    the query's pid and camera are ignored; queries with no correct match left are skipped.
    Raises ValueError on malformed inputs or when no query has a correct match.
    """
    dist = distmat.detach().cpu().numpy() if isinstance(distmat, torch.Tensor) else np.asarray(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be [Q, G], got shape {dist.shape}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    num_q, num_g = dist.shape
    q_pids, q_camids = _as_array("q_pids", q_pids, num_q), _as_array("q_camids", q_camids, num_q)
    g_pids, g_camids = _as_array("g_pids", g_pids, num_g), _as_array("g_camids", g_camids, num_g)

    all_cmc, all_ap = [], []
    for i in range(num_q):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        matches = (g_pids[order][keep] == q_pids[i]).astype(np.float64)
        num_rel = matches.sum()
        if num_rel == 0:
            continue
        cmc = np.minimum(matches.cumsum(), 1.0)[:max_rank]
        if len(cmc) < max_rank:  # fewer valid gallery entries than max_rank: the curve stays flat
            cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1])])
        all_cmc.append(cmc)
        precision_at_hits = matches.cumsum() / np.arange(1, len(matches) + 1)
        all_ap.append(float((precision_at_hits * matches).sum() / num_rel))
    if not all_cmc:
        raise ValueError("no query has a correct match in the gallery (different camera): nothing to evaluate")
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap))


def chance_rank(q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, trials: int = 20, seed: int = 0):
    """(cmc, mAP) of random rankings, averaged over ``trials`` random distance matrices."""
    q_pids = _as_array("q_pids", q_pids)
    g_pids = _as_array("g_pids", g_pids)
    rng = np.random.default_rng(seed)
    runs = [evaluate_rank(rng.random((len(q_pids), len(g_pids))), q_pids, g_pids, q_camids, g_camids, max_rank)
            for _ in range(trials)]
    return np.mean([c for c, _ in runs], axis=0), float(np.mean([m for _, m in runs]))


from fastnl.rerank import re_ranking  # noqa: E402  (k-reciprocal re-ranking, part of this API)
