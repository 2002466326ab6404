"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), with the conventions of the authors' code as torchreid ships it.

With ``N = Q + G`` probe-and-gallery items and ``D`` the [N, N] matrix of the given distances
(query-query, query-gallery, gallery-gallery blocks):

- ``d(i, j) = D[j, i]^2 / max_m D[m, i]^2`` (squared, each column scaled to a maximum of 1),
  float32;
- ``N(i, k)`` = the k + 1 nearest items of i under d (i itself included);
- ``R(i, k) = {j in N(i, k) : i in N(j, k)}`` (k-reciprocal neighbours, eq. 4);
- ``R*(i, k1) = R(i, k1)`` united with every ``R(c, round(k1 / 2))``, c in ``R(i, k1)``, that
  shares more than 2/3 of its members with ``R(i, k1)`` (eq. 5; the code's strict ">");
- ``V[i, j] = exp(-d(i, j)) / sum_{j' in R*} exp(-d(i, j'))`` for j in ``R*(i, k1)``, else 0
  (eq. 7), then, for k2 > 1, the local query expansion ``V[i] <- mean of V[j]`` over the k2
  nearest j of i (eq. 11);
- Jaccard distance ``dJ(i, j) = 1 - s / (2 - s)`` with ``s = sum_m min(V[i, m], V[j, m])``
  (eq. 10, with the code's ``|union| = 2 - s`` for rows summing to 1);
- result ``(1 - lambda) dJ + lambda d`` on the query x gallery block (eq. 12).

Unlike the reference code, nothing of size N x N is sorted or materialised more than a few
times: only the k1 + 1 nearest neighbours of each item are found (top-k, in row chunks), V is
kept dense (N x N float32: 0.6 GB at N = 12,000) and the Jaccard sums run over its non-zeros
(an inverted index, in chunks of queries), on the GPU when there is one.
"""
from __future__ import annotations

import numpy as np
import torch

from fastnl.runtime import default_device


def _check(name: str, a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must hold finite numbers")
    return a


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, *, device=None, chunk_bytes: int = 1 << 28) -> np.ndarray:
    """Re-ranked [num_query, num_gallery] distances (float32 numpy) from the query-gallery,
    query-query and gallery-gallery distances (numpy or torch, e.g. L2); k1=20, k2=6,
    lambda_value=0.3 are the paper's. ``device`` (default: CUDA when available) runs the work;
    ``chunk_bytes`` bounds each chunk's temporary memory."""
    q_g = np.asarray(q_g_dist.detach().cpu() if isinstance(q_g_dist, torch.Tensor) else q_g_dist)
    if q_g.ndim != 2:
        raise ValueError(f"q_g_dist must be [num_query, num_gallery], got shape {q_g.shape}")
    nq, ng = q_g.shape
    q_g = _check("q_g_dist", q_g, (nq, ng))
    q_q = _check("q_q_dist", q_q_dist, (nq, nq))
    g_g = _check("g_g_dist", g_g_dist, (ng, ng))
    n = nq + ng
    if not (isinstance(k1, int) and isinstance(k2, int)) or k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be integers >= 1, got k1={k1}, k2={k2}")
    if k1 + 1 > n or k2 > n:
        raise ValueError(f"k1 + 1 ({k1 + 1}) and k2 ({k2}) must not exceed the {n} query and "
                         "gallery items")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")
    dev = torch.device(device) if device is not None else default_device()

    # d = (D^2 scaled per column)^T, float32 like the reference code.
    full = np.empty((n, n), dtype=np.float32)  # filled block by block: no float64 N x N copy
    full[:nq, :nq], full[:nq, nq:], full[nq:, :nq], full[nq:, nq:] = q_q, q_g, q_g.T, g_g
    dist = torch.from_numpy(full).to(dev)
    del full
    dist.pow_(2)
    colmax = dist.amax(dim=0)
    dist = dist.t().contiguous()
    dist.div_(colmax[:, None])
    del colmax

    rows = max(1, min(n, chunk_bytes // (8 * n)))
    kk = max(k1 + 1, k2)
    rank = torch.empty(n, kk, dtype=torch.long, device=dev)
    for s in range(0, n, rows):
        rank[s:s + rows] = torch.topk(dist[s:s + rows], kk, dim=1, largest=False, sorted=True).indices

    def reciprocal(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N(i, k) as [N, k+1] indices, mask of the members of R(i, k))."""
        fwd = rank[:, :k + 1]
        mask = torch.empty_like(fwd, dtype=torch.bool)
        ids = torch.arange(n, device=dev)
        step = max(1, chunk_bytes // (8 * (k + 1) ** 2))
        for s in range(0, n, step):
            back = fwd[fwd[s:s + step]]  # [c, k+1, k+1]
            mask[s:s + step] = (back == ids[s:s + step, None, None]).any(-1)
        return fwd, mask

    fwd, rmask = reciprocal(k1)
    kh = int(np.around(k1 / 2.0))
    fwd_h, rmask_h = reciprocal(kh)

    # V, dense, built in row chunks.
    V = torch.zeros(n, n, dtype=torch.float32, device=dev)
    step = max(1, min(rows, chunk_bytes // (4 * (k1 + 1) ** 2 * (kh + 1))))
    for s in range(0, n, step):
        f, m = fwd[s:s + step], rmask[s:s + step]  # [c, k1+1]
        cand_set, cand_mask = fwd_h[f], rmask_h[f]  # [c, k1+1, kh+1]: R(cand, kh)
        # |R(cand, kh) ∩ R(i, k1)|: members of R(cand, kh) found among R(i, k1)
        in_r = ((cand_set[..., None] == f[:, None, None, :]) & m[:, None, None, :]).any(-1)
        inter = (in_r & cand_mask).sum(-1)
        size = cand_mask.sum(-1)
        take = m & (inter.float() > (2.0 / 3.0) * size.float())  # [c, k1+1]
        member = torch.zeros(f.shape[0], n, dtype=torch.bool, device=dev)
        member.scatter_(1, f, m)
        extra = (cand_mask & take[..., None]).reshape(f.shape[0], -1)  # R(cand, kh) taken
        r_idx = torch.arange(f.shape[0], device=dev)[:, None].expand_as(extra)
        member[r_idx[extra], cand_set.reshape(f.shape[0], -1)[extra]] = True
        w = torch.exp(-dist[s:s + step]) * member
        V[s:s + step] = w / w.sum(1, keepdim=True)
        del member, w

    if k2 != 1:
        V_qe = torch.empty_like(V)
        step2 = max(1, chunk_bytes // (4 * n * k2))
        for s in range(0, n, step2):
            V_qe[s:s + step2] = V[rank[s:s + step2, :k2]].mean(1)
        V = V_qe
        del V_qe
    del rank, fwd, rmask, fwd_h, rmask_h

    # Jaccard sums over the non-zeros of V: s[i, j] = sum_m min(V[i, m], V[j, m]), i < nq,
    # j >= nq, through the column lists of the gallery rows (an inverted index).
    g_rows, g_cols = torch.nonzero(V[nq:], as_tuple=True)
    order = torch.argsort(g_cols, stable=True)
    inv_rows, inv_cols = g_rows[order], g_cols[order]
    inv_vals = V[nq:][inv_rows, inv_cols]
    col_count = torch.bincount(inv_cols, minlength=n)
    col_start = torch.cumsum(col_count, 0) - col_count
    sims = torch.zeros(nq, ng, dtype=torch.float32, device=dev)
    q_rows, q_cols = torch.nonzero(V[:nq], as_tuple=True)
    q_vals = V[:nq][q_rows, q_cols]
    pairs = col_count[q_cols]
    budget = max(1, chunk_bytes // 24)
    ends = torch.cumsum(pairs, 0)
    s = 0
    while s < len(q_rows):
        base = int(ends[s - 1]) if s else 0
        e = int(torch.searchsorted(ends, torch.tensor(base + budget, device=dev), right=True))
        e = max(e, s + 1)
        cnt = pairs[s:e]
        total = int(cnt.sum())
        if total:
            rep = torch.repeat_interleave(torch.arange(s, e, device=dev), cnt)
            offs = torch.arange(total, device=dev) - torch.repeat_interleave(
                torch.cumsum(cnt, 0) - cnt, cnt)
            pos = col_start[q_cols[rep]] + offs
            contrib = torch.minimum(q_vals[rep], inv_vals[pos])
            sims.view(-1).index_add_(0, q_rows[rep] * ng + inv_rows[pos], contrib)
        s = e
    del V
    jaccard = 1.0 - sims / (2.0 - sims)
    final = jaccard * (1.0 - lambda_value) + dist[:nq, nq:] * lambda_value
    return final.cpu().numpy()
