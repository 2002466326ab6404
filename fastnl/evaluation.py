"""Evaluation (paper section 4.2, test protocol): each query and gallery tracklet is cut into
consecutive N-frame sequences, their descriptors are averaged into one per tracklet, L2
distances rank the gallery, and :func:`fastnl.metrics.evaluate_rank` gives CMC and mAP."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from fastnl import runtime
from fastnl.checkpoint import load_checkpoint
from fastnl.errors import UserError
from fastnl.metrics import chance_rank, evaluate_rank, l2_distances

RANKS = (1, 5, 10, 20)
RERANK_K1, RERANK_K2, RERANK_LAMBDA = 20, 6, 0.3  # Zhong et al. 2017, as torchreid uses them


def model_from_checkpoint(path, *, impl: str | None = None, device="cpu"):
    """(model in eval mode on ``device``, its training config as a dict) from a `fastnl train`
    checkpoint: the network its saved :class:`TrainConfig` describes (options it does not
    record take TrainConfig's defaults), with ``impl`` in place of the saved one when given."""
    from fastnl.model import build_model
    from fastnl.train_config import TrainConfig

    state = load_checkpoint(path)
    cfg = TrainConfig.from_dict(state.get("config") or {}, source=f"checkpoint {path}: its config")
    if impl is not None:
        cfg = dataclasses.replace(cfg, impl=impl)
        cfg.check_values()
    try:
        model = build_model(int(state["num_classes"]), **cfg.model_options(), verbose=False)
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"checkpoint {path} does not match the network it describes: {err}") from None
    return model.to(device).eval(), cfg.to_dict()


@torch.no_grad()
def extract_descriptors(model, tracklets, *, frames: int, height: int, width: int, batch_size: int = 32,
                        device="cpu", amp_dtype=None, backend: str = "torch", workers: int = 2,
                        progress: bool = True, desc: str = "descriptors") -> torch.Tensor:
    """One descriptor per tracklet [T, D] (float32, on CPU): the mean over its N-frame sequences."""
    from tqdm import tqdm

    from fastnl.data.loader import build_test_loader

    device = torch.device(device)
    loader = build_test_loader(tracklets, frames=frames, height=height, width=width,
                               batch_size=batch_size, backend=backend, workers=workers)
    model.eval()
    sums, counts = None, torch.zeros(len(tracklets), dtype=torch.float64)
    for clips, index in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        with runtime.autocast(device, amp_dtype):
            out = model(clips.to(device, non_blocking=True)).double().cpu()
        if sums is None:
            sums = torch.zeros(len(tracklets), out.shape[1], dtype=torch.float64)
        sums.index_add_(0, index, out)
        counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    if sums is None or (counts == 0).any():
        raise UserError(f"{desc}: {int((counts == 0).sum())} tracklets gave no sequence to describe")
    return (sums / counts[:, None]).float()


def evaluate(model, dataset, *, frames: int, height: int, width: int, batch_size: int = 32, device="cpu",
             amp_dtype=None, backend: str = "torch", workers: int = 2, progress: bool = True,
             max_rank: int = 50, rerank: bool = False) -> dict:
    """CMC (``rank1`` ... ``rank20``, ``cmc``) and ``mAP`` of ``model`` on the dataset's query and
    gallery, in [0, 1], with the same numbers for random rankings under ``chance``. Ranks above
    the gallery size are left out (a gallery of 13 tracklets has no rank 20). The distance
    matrix and the id/camera arrays are returned too (for :func:`visualize_ranks`). With
    ``rerank``, the same figures after k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) are
    under ``reranked``."""
    kw = dict(frames=frames, height=height, width=width, batch_size=batch_size, device=device,
              amp_dtype=amp_dtype, backend=backend, workers=workers, progress=progress)
    q = extract_descriptors(model, dataset.query, desc="query", **kw)
    g = extract_descriptors(model, dataset.gallery, desc="gallery", **kw)
    distmat = l2_distances(q, g).numpy()
    q_pids, q_cams = (np.array([t[i] for t in dataset.query]) for i in (1, 2))
    g_pids, g_cams = (np.array([t[i] for t in dataset.gallery]) for i in (1, 2))
    max_rank = min(max_rank, len(g_pids))
    try:
        cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    except ValueError as err:
        raise UserError(f"cannot evaluate: {err}") from None
    chance_cmc, chance_map = chance_rank(q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)

    def summary(c, m):  # a gallery of G entries has no rank above G: those are left out
        return {"mAP": float(m), **{f"rank{r}": float(c[r - 1]) for r in RANKS if r <= max_rank},
                "cmc": [float(x) for x in c]}

    out = {**summary(cmc, mAP), "chance": summary(chance_cmc, chance_map),
           "num_query": len(q_pids), "num_gallery": len(g_pids),
           "distmat": distmat, "q_pids": q_pids, "g_pids": g_pids, "q_camids": q_cams, "g_camids": g_cams}
    if rerank:
        out["reranked"] = summary(*rerank_and_rank(q, g, q_pids, g_pids, q_cams, g_cams, max_rank,
                                                   device=device))
    return out


def rerank_and_rank(q, g, q_pids, g_pids, q_cams, g_cams, max_rank: int, *, device="cpu",
                    k1: int = RERANK_K1, k2: int = RERANK_K2, lambda_value: float = RERANK_LAMBDA):
    """(cmc, mAP) after k-reciprocal re-ranking of the L2 distances between descriptors q, g;
    k1 is capped to the number of items minus one on small test sets."""
    from fastnl.metrics import re_ranking

    q, g = q.to(device), g.to(device)
    n = len(q) + len(g)
    dist = re_ranking(l2_distances(q, g).cpu().numpy(), l2_distances(q, q).cpu().numpy(),
                      l2_distances(g, g).cpu().numpy(), k1=min(k1, n - 1), k2=min(k2, n),
                      lambda_value=lambda_value, device=torch.device(device))
    try:
        return evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    except ValueError as err:
        raise UserError(f"cannot evaluate the re-ranked distances: {err}") from None


def average_splits(per_split: list[dict]) -> dict:
    """The mean over splits of ``mAP`` and the CMC ranks (and of ``reranked`` when present)."""
    keys = ("mAP",) + tuple(f"rank{r}" for r in RANKS if all(f"rank{r}" in s for s in per_split))
    out = {k: float(np.mean([r[k] for r in per_split])) for k in keys}
    out["std"] = {k: float(np.std([r[k] for r in per_split])) for k in keys}
    if all("reranked" in r for r in per_split):
        out["reranked"] = average_splits([r["reranked"] for r in per_split])
    return out


def splits_table(per_split: list[dict], split_ids, *, key: str | None = None) -> str:
    """One row per split (mAP and the CMC ranks, in percent) and their mean and standard
    deviation; ``key="reranked"`` tabulates the re-ranked figures."""
    rows = [r[key] if key else r for r in per_split]
    cols = ("mAP",) + tuple(f"rank{r}" for r in RANKS if all(f"rank{r}" in s for s in rows))
    lines = [f"{'split':<8}" + "".join(f"{c:>9}" for c in cols)]
    for sid, r in zip(split_ids, rows):
        lines.append(f"{sid:<8}" + "".join(f"{100 * r[c]:>8.1f}%" for c in cols))
    mean = average_splits(rows)
    lines.append(f"{'mean':<8}" + "".join(f"{100 * mean[c]:>8.1f}%" for c in cols))
    lines.append(f"{'std':<8}" + "".join(f"{100 * mean['std'][c]:>8.1f}%" for c in cols))
    return "\n".join(lines)


def results_table(results: dict) -> str:
    """The CMC/mAP table, in percent, with the chance level beside each number."""
    chance = results.get("chance")
    lines = [f"{'metric':<8}{'model':>9}" + (f"{'chance':>9}" if chance else "")]
    for key in ("mAP",) + tuple(f"rank{r}" for r in RANKS):
        if key not in results:
            continue
        line = f"{key:<8}{100 * results[key]:>8.1f}%"
        if chance:
            line += f"{100 * chance[key]:>8.1f}%"
        lines.append(line)
    missing = [f"rank{r}" for r in RANKS if f"rank{r}" not in results]
    if missing and "num_gallery" in results:
        lines.append(f"({', '.join(missing)} not shown: the gallery has {results['num_gallery']} tracklets)")
    return "\n".join(lines)


def write_json(results: dict, path: Path, **extra) -> Path:
    keep = {k: v for k, v in results.items() if not isinstance(v, np.ndarray)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**keep, **extra}, indent=2) + "\n")
    return path


def visualize_ranks(results: dict, dataset, num_queries: int, path: Path, *, top: int = 10,
                    cell: tuple[int, int] = (128, 64)) -> Path:
    """A PNG grid: ``num_queries`` queries (evenly spread) with their ``top`` gallery tracklets
    (the middle frame of each), framed green for the right id and red for a wrong one. Gallery
    entries ignored by the protocol (same id and camera as the query) are left out."""
    from PIL import Image, ImageDraw, ImageOps

    dist, q_pids, g_pids = results["distmat"], results["q_pids"], results["g_pids"]
    q_cams, g_cams = results["q_camids"], results["g_camids"]
    with_match = [i for i in range(len(q_pids))
                  if ((g_pids == q_pids[i]) & (g_cams != q_cams[i])).any()]
    if not with_match:
        raise UserError("no query has a correct match to show")
    chosen = [with_match[j] for j in np.linspace(0, len(with_match) - 1, min(num_queries, len(with_match))).astype(int)]
    h, w = cell
    pad, gap, label = 4, 12, 14
    grid = Image.new("RGB", ((top + 1) * (w + 2 * pad) + gap, len(chosen) * (h + 2 * pad + label)), "white")
    draw = ImageDraw.Draw(grid)

    def tile(tracklet, colour):
        frames = tracklet[0]
        img = Image.open(frames[len(frames) // 2]).convert("RGB").resize((w, h))
        return ImageOps.expand(img, border=pad, fill=colour)

    for row, qi in enumerate(chosen):
        y = row * (h + 2 * pad + label)
        grid.paste(tile(dataset.query[qi], (60, 60, 60)), (0, y))
        draw.text((2, y + h + 2 * pad), f"q id {q_pids[qi]}", fill="black")
        order = np.argsort(dist[qi], kind="stable")
        order = [j for j in order if not (g_pids[j] == q_pids[qi] and g_cams[j] == q_cams[qi])][:top]
        for col, gj in enumerate(order, start=1):
            x = col * (w + 2 * pad) + gap
            right = g_pids[gj] == q_pids[qi]
            grid.paste(tile(dataset.gallery[gj], (0, 170, 0) if right else (220, 0, 0)), (x, y))
            draw.text((x + 2, y + h + 2 * pad), f"{col}: id {g_pids[gj]}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
