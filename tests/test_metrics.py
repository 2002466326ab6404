"""evaluate_rank against hand-computed numbers and an independent pure-Python computation."""
import json

import numpy as np
import pytest
import torch

from fastnl.metrics import chance_rank, evaluate_rank, l2_distances


def brute_force(dist, q_pids, g_pids, q_cams, g_cams, max_rank):
    """The protocol written out one entry at a time, with no numpy vector tricks."""
    cmcs, aps = [], []
    for i in range(len(q_pids)):
        valid = [j for j in range(len(g_pids)) if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        ranked = sorted(valid, key=lambda j: (float(dist[i][j]), j))
        hits = [g_pids[j] == q_pids[i] for j in ranked]
        if not any(hits):
            continue
        first = hits.index(True)
        cmcs.append([1.0 if k >= first else 0.0 for k in range(max_rank)])
        found, precisions = 0, []
        for pos, hit in enumerate(hits, start=1):
            if hit:
                found += 1
                precisions.append(found / pos)
        aps.append(sum(precisions) / len(precisions))
    return [sum(c[k] for c in cmcs) / len(cmcs) for k in range(max_rank)], sum(aps) / len(aps)


def test_hand_built_case_with_same_camera_removal_and_a_query_without_match():
    # gallery: pids 1 1 2 2 3, cameras 0 1 0 1 1
    g_pids, g_cams = np.array([1, 1, 2, 2, 3]), np.array([0, 1, 0, 1, 1])
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 1, 1])
    dist = np.array([
        [0.0, 0.5, 0.1, 0.2, 0.3],  # q pid1 cam0: gallery 0 (same pid+cam) ignored; ranking 2,3,4,1
        [0.9, 0.8, 0.1, 0.0, 0.7],  # q pid2 cam1: gallery 3 ignored; ranking 2 (hit), 4, 1, 0
        [0.1, 0.2, 0.3, 0.4, 0.0],  # q pid3 cam1: its only gallery entry is same camera -> skipped
    ])
    cmc, mAP = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=4)
    # query 0: first hit at rank 4, AP = 1/4; query 1: hit at rank 1, AP = 1
    np.testing.assert_allclose(cmc, [0.5, 0.5, 0.5, 1.0])
    assert mAP == pytest.approx((0.25 + 1.0) / 2)


def test_ties_are_broken_by_gallery_order():
    dist = np.zeros((1, 4))
    cmc, mAP = evaluate_rank(dist, [7], [5, 7, 6, 7], [0], [1, 1, 1, 1], max_rank=4)
    # ranking 0 (miss), 1 (hit), 2 (miss), 3 (hit): AP = (1/2 + 2/4) / 2
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0, 1.0])
    assert mAP == pytest.approx(0.5)


def test_max_rank_beyond_the_gallery_stays_flat():
    cmc, mAP = evaluate_rank(np.array([[0.3, 0.1]]), [1], [1, 2], [0], [1, 1], max_rank=5)
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0, 1.0, 1.0])
    assert mAP == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_random_cases_match_the_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_q, num_g, max_rank = 12, 40, 10
    q_pids, g_pids = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    dist = rng.integers(0, 5, (num_q, num_g)).astype(np.float64)  # many ties
    cmc, mAP = evaluate_rank(torch.from_numpy(dist), torch.from_numpy(q_pids), g_pids, q_cams, g_cams, max_rank)
    want_cmc, want_map = brute_force(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    assert cmc.shape == (max_rank,) and np.all(np.diff(cmc) >= 0) and 0 <= mAP <= 1
    np.testing.assert_allclose(cmc, want_cmc, rtol=0, atol=1e-12)
    assert mAP == pytest.approx(want_map, abs=1e-12)


def test_perfect_ranking_and_chance():
    pids = np.repeat(np.arange(10), 2)
    cams = np.tile([0, 1], 10)
    q, g = pids[::2], pids[1::2]
    dist = (q[:, None] != g[None, :]).astype(float)
    cmc, mAP = evaluate_rank(dist, q, g, cams[::2], cams[1::2], max_rank=10)
    assert cmc[0] == 1.0 and mAP == 1.0
    chance_cmc, chance_map = chance_rank(q, g, cams[::2], cams[1::2], max_rank=10, trials=200)
    assert chance_cmc[0] == pytest.approx(0.1, abs=0.03)  # one right answer out of 10
    assert chance_cmc[-1] == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no query has a correct match"):
        evaluate_rank(np.zeros((1, 2)), [1], [2, 3], [0], [1, 1])
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_rank(np.zeros((1, 2)), [1], [2, 3, 4], [0], [1, 1])
    with pytest.raises(ValueError, match="distmat"):
        evaluate_rank(np.zeros(3), [1], [2, 3, 4], [0], [1, 1, 1])


def test_l2_distances_in_chunks_match_cdist():
    torch.manual_seed(0)
    q, g = torch.randn(37, 16, dtype=torch.float64), torch.randn(23, 16, dtype=torch.float64)
    want = torch.cdist(q, g)
    got = l2_distances(q, g, chunk_size=5)
    assert got.shape == (37, 23) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_eval_shows_no_rank_the_gallery_cannot_have(tmp_path):
    from fastnl.data.datasets import get_dataset
    from fastnl.data.synthetic import write_dataset
    from fastnl.evaluation import evaluate, results_table, write_json

    root = write_dataset(tmp_path / "d", fmt="dukevideo", ids=8, cams=2, seed=0, size=(32, 16), min_frames=2,
                         max_frames=3)
    dataset = get_dataset("synthetic", root)
    gallery = len(dataset.gallery)
    assert 10 <= gallery < 20

    class MeanColour(torch.nn.Module):
        def forward(self, clips):
            return clips.mean(dim=(1, 3, 4))

    results = evaluate(MeanColour(), dataset, frames=2, height=32, width=16, workers=0, progress=False)
    assert [k for k in results if k.startswith("rank")] == ["rank1", "rank5", "rank10"]
    assert len(results["cmc"]) == gallery
    assert results["chance"].keys() == {"mAP", "rank1", "rank5", "rank10", "cmc"}
    table = results_table(results).splitlines()
    assert [line.split()[0] for line in table[1:-1]] == ["mAP", "rank1", "rank5", "rank10"]
    assert table[-1] == f"(rank20 not shown: the gallery has {gallery} tracklets)"
    saved = json.loads(write_json(results, tmp_path / "eval.json").read_text())
    assert "rank20" not in saved and saved["num_gallery"] == gallery
