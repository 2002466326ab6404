"""k-reciprocal re-ranking against a plain, loop-and-set implementation written here from the
paper's equations (Zhong et al. CVPR 2017, eqs. 4-12, with the authors' code conventions named
in fastnl.rerank), plus properties that pin the numbers."""
import numpy as np
import pytest

from fastnl.metrics import evaluate_rank, re_ranking


def plain_re_ranking(q_g, q_q, g_g, k1=20, k2=6, lam=0.3):
    nq = len(q_g)
    D = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    d = (D / D.max(axis=0)).T  # d(i, j) = D[j, i]^2 / max_m D[m, i]^2
    n = len(d)
    near = [list(np.argsort(d[i], kind="stable")) for i in range(n)]

    def R(i, k):  # eq. 4: k-reciprocal neighbours (N(i, k) holds k + 1 items, i included)
        return {j for j in near[i][:k + 1] if i in near[j][:k + 1]}

    V = np.zeros((n, n))
    for i in range(n):
        r = R(i, k1)
        star = set(r)
        for c in r:  # eq. 5
            rc = R(c, int(round(k1 / 2)))
            if len(rc & r) > 2 / 3 * len(rc):
                star |= rc
        idx = sorted(star)
        w = np.exp(-d[i, idx])
        V[i, idx] = w / w.sum()  # eq. 7
    if k2 > 1:  # eq. 11
        V = np.stack([V[near[i][:k2]].mean(0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(nq, n):
            s = np.minimum(V[i], V[j]).sum()
            out[i, j - nq] = (1 - lam) * (1 - s / (2 - s)) + lam * d[i, j]  # eqs. 10, 12
    return out


def features(nq, ng, dim, seed, ids=6):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim))
    lab = rng.integers(0, ids, nq + ng)
    x = centers[lab] + 0.6 * rng.normal(size=(nq + ng, dim))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return dist[:nq, nq:], dist[:nq, :nq], dist[nq:, nq:], lab[:nq], lab[nq:]


@pytest.mark.parametrize("nq, ng, k1, k2, lam, seed", [
    (6, 25, 20, 6, 0.3, 0), (8, 20, 5, 3, 0.5, 1), (5, 15, 4, 1, 0.0, 2), (10, 30, 7, 2, 0.9, 3)])
def test_matches_the_equations(nq, ng, k1, k2, lam, seed):
    qg, qq, gg, _, _ = features(nq, ng, 8, seed)
    want = plain_re_ranking(qg, qq, gg, k1, k2, lam)
    got = re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (nq, ng) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # tiny chunks (many rows / pairs per chunk boundary) give the same numbers
    np.testing.assert_allclose(re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam,
                                          chunk_bytes=64), got, rtol=0, atol=1e-7)


def test_properties():
    qg, qq, gg, ql, gl = features(12, 40, 16, 4)
    # lambda = 1: the scaled squared original distance, d(i, j) = D[i, j]^2 / max_m D[m, i]^2
    D2 = np.block([[qq, qg], [qg.T, gg]]) ** 2
    d = re_ranking(qg, qq, gg, lambda_value=1.0)
    np.testing.assert_allclose(d, qg ** 2 / D2.max(axis=0)[:12, None], rtol=1e-6, atol=1e-7)
    r = re_ranking(qg, qq, gg)
    assert r.min() >= -1e-6 and r.max() <= 1 + 1e-6
    # lambda = 0: the Jaccard distance alone, in [0, 1]; lambda mixes the two linearly (eq. 12)
    j = re_ranking(qg, qq, gg, lambda_value=0.0)
    assert -1e-6 <= j.min() and j.max() <= 1  # float32 rounding: s may exceed 1 by an ulp
    np.testing.assert_allclose(r, 0.7 * j + 0.3 * d, rtol=0, atol=1e-6)
    # on well separated identities re-ranking keeps rank-1 and mAP at least as good
    cams_q, cams_g = np.zeros(12), np.ones(40)
    _, map_before = evaluate_rank(qg, ql, gl, cams_q, cams_g, max_rank=5)
    _, map_after = evaluate_rank(r, ql, gl, cams_q, cams_g, max_rank=5)
    assert map_after >= map_before - 1e-9


def test_bad_input():
    qg, qq, gg, _, _ = features(4, 10, 4, 5)
    with pytest.raises(ValueError, match=r"q_q_dist must have shape \(4, 4\)"):
        re_ranking(qg, gg, gg)
    with pytest.raises(ValueError, match="must not exceed the 14 query and gallery items"):
        re_ranking(qg, qq, gg, k1=20)
    with pytest.raises(ValueError, match="lambda_value must lie in"):
        re_ranking(qg, qq, gg, k1=3, lambda_value=2)
