"""Which attention engine ``backend="auto"`` runs on CUDA, by cost, and the work each executes.

Engines (backends of :func:`fastnl.ops.nl_attention`):

- ``triton``: the flash kernel (``kernels/nl_attention.py``): nothing of size L x L in memory,
  but at large D each score tile is recomputed once per output column chunk.
- ``chunked``: query blocks on tensor-core GEMMs, each score tile computed once, the row work
  in Triton (``fastnl/attention_chunked.py``); O(block * L) extra memory.
- ``torch``: the same chunked engine with the row work in PyTorch ops (more passes over a
  tile: the scale and torch's fused softmax in place, casts, dS in three in-place ops).

``auto`` looks the engine up in a table keyed by (GPU capability, dtype, D, L): the nearest D
and L (log scale) of the entry for the GPU's capability and the dtype. The committed table,
``engine_table.json`` beside this file, is the cost model below evaluated on a Hopper GPU
(H100/H200, sm_90); ``FASTNL_ENGINE_TABLE=FILE`` replaces it by another in the same format,
e.g. the one the GPU suite writes from measured times (``fastnl bench attention --engine-table``).

The cost model (an estimate until the GPU suite measures): a pass costs its GEMM flops at a
fraction of the tensor-core peak, plus the bytes its row kernels move over the memory
bandwidth, plus a launch overhead per kernel. The flash kernel's flops are the executed ones
(``executed_flops``), at a lower fraction of the peak (one CTA per SM, no TMA).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastnl.vocabulary import ATTENTION_ENGINES as ENGINES

TABLE_PATH = Path(__file__).with_name("engine_table.json")
TABLE_DTYPES = ("bf16", "fp16", "fp32")
TABLE_HEAD_DIMS = (16, 32, 64, 128, 256, 512, 1024)
TABLE_LENGTHS = (256, 1024, 4096, 8192, 16384)
TABLE_BATCH = 8  # clips of the paper's P x K batch per GPU, rounded


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple
    tensor_tflops: float  # dense bf16/fp16 tensor-core peak
    fp32_tflops: float  # fp32 without tensor cores (torch's default: no TF32 for matmuls)
    bandwidth_tbs: float  # HBM, achieved by a large copy
    gemm_efficiency: float = 0.75  # large cuBLAS GEMMs
    flash_efficiency: float = 0.35  # the Triton flash kernel at large D: one CTA per SM, no TMA
    launch_us: float = 4.0


# H100 SXM: 990 bf16 TFLOP/s dense is the data sheet; 800 is what large GEMMs reach.
HOPPER = GPU("H100/H200 (sm_90)", (9, 0), tensor_tflops=800.0, fp32_tflops=60.0, bandwidth_tbs=3.3)
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _flash_kernels():
    from fastnl._paths import import_kernels

    return import_kernels().nl_attention


def executed_flops(engine: str, L: int, D: int, configs: dict | None = None, batch: int = 1,
                   device_type: str = "cuda") -> dict:
    """Flops ``engine`` executes for one clip of L positions and head dim D, forward and backward
    (the backward's recomputation of the scores included), beside the useful ones (forward
    4 L^2 D, backward 10 L^2 D). For ``triton``, ``configs`` maps "fwd", "dkdv", "dq" to the
    BLOCK_DV of each kernel (default: their default configurations): a program grid of chunk
    width BLOCK_DV computes each score tile ceil(D / BLOCK_DV) times
    (``fastnl.kernels.nl_attention.executed_flops``). The chunked engines skip the backward's
    recomputation of S for the share of P their forward keeps for ``batch`` clips on
    ``device_type`` (``fastnl.attention_chunked.kept_fraction``: all of it where one tile holds
    the scores, on a CPU the first blocks within a budget)."""
    unit = L * L * D
    useful = {"fwd": 4 * unit, "bwd": 10 * unit}
    if engine in ("chunked", "torch"):
        executed = {"fwd": 4 * unit, "bwd": (10 - 2 * _kept_fraction(L, D, batch, device_type)) * unit}
    elif engine in ("plain", "reference"):
        # autograd keeps P: no recomputation in the backward (dV, dP, dQ, dK)
        executed = {"fwd": 4 * unit, "bwd": 8 * unit}
    elif engine == "triton":
        return _flash_kernels().executed_flops(L, D, configs)
    else:
        raise ValueError(f"no flop count for engine {engine!r}")
    return {"fwd": executed["fwd"], "bwd": executed["bwd"], "fwd_useful": useful["fwd"],
            "bwd_useful": useful["bwd"], "fwd_ratio": executed["fwd"] / useful["fwd"],
            "bwd_ratio": executed["bwd"] / useful["bwd"]}


def _kept_fraction(L: int, D: int, B: int, device_type: str = "cuda") -> float:
    """The share of the score matrix whose P the chunked engine's forward keeps."""
    from fastnl.attention_chunked import kept_fraction

    return kept_fraction(L, D, B, device_type)


def _chunk_steps(L: int, B: int) -> tuple[int, int]:
    """(steps, query blocks per clip) of the chunked engine's plan on CUDA."""
    from fastnl.attention_chunked import plan

    clips, block = plan(L, B, "cuda")
    per_clip = math.ceil(L / block)
    return math.ceil(B / clips) * per_clip, per_clip


def predict_ms(engine: str, dtype: str, B: int, L: int, D: int, gpu: GPU = HOPPER) -> dict:
    """Predicted forward and forward+backward milliseconds of ``engine`` (or the baseline
    ``plain``: bmm + softmax under autocast) by the cost model."""
    e = _BYTES[dtype]
    peak = (gpu.tensor_tflops if dtype != "fp32" else gpu.fp32_tflops) * 1e12
    bw = gpu.bandwidth_tbs * 1e12
    tiles = B * L * L  # score elements of one pass
    flops = executed_flops(engine, L, D, batch=B)
    launch = gpu.launch_us * 1e-6
    if engine == "triton":
        fwd = B * flops["fwd"] / (peak * gpu.flash_efficiency) + launch
        bwd = B * flops["bwd"] / (peak * gpu.flash_efficiency) + 4 * launch
    elif engine in ("chunked", "torch", "plain"):
        gemm = peak * gpu.gemm_efficiency
        steps, per_clip = _chunk_steps(L, B)
        keeps = _kept_fraction(L, D, B) >= 1.0  # on CUDA: all or nothing
        if engine == "chunked":
            two_pass = 4 if L > 16384 else 0
            # row kernels: read S, write P; read S and dP, write P and dS (or read the kept P)
            fwd_bytes, bwd_bytes = 4 + e + two_pass, (4 + 2 * e) if keeps else (8 + 2 * e)
            fwd_launches, bwd_launches = 3 * steps, 7 * steps
            acc_bytes = per_clip * 2 * 2 * B * L * D * 4  # dK and dV read and written per block
        elif engine == "torch":
            # in place on the float32 tile: the scale and torch's fused softmax (one read and one
            # write each), then P cast for the GEMM; backward: S again (scale, softmax), then
            # dP - delta, times P (which it reads), the scale, P and dS cast; where the forward
            # kept P, the backward starts from it (no S GEMM, scale or softmax)
            fwd_bytes = 8 + 8 + (4 + e)
            bwd_bytes = (8 + (8 + e) + 8 + (4 + e)) if keeps else (8 + 8 + 8 + 12 + 8 + 2 * (4 + e))
            fwd_launches, bwd_launches = 5 * steps, (8 if keeps else 12) * steps
            acc_bytes = per_clip * 2 * 2 * B * L * D * 4
        else:
            # under autocast: S written in the autocast dtype, scaled, cast to float32 for the
            # softmax (autocast runs it in float32), softmax, cast back for the bmm, read by it;
            # backward: dP, cast up, softmax backward (reads P and dP), cast down, scale, read by
            # the dQ and dK GEMMs, P read by the dV GEMM
            scaled = 2 * e
            fwd_bytes = e + scaled + (e + 4) + 8 + (4 + e) + e
            bwd_bytes = e + (e + 4) + 12 + (4 + e) + scaled + 2 * e + e
            fwd_launches, bwd_launches, acc_bytes = 6, 9, 0
        fwd = B * flops["fwd"] / gemm + tiles * fwd_bytes / bw + fwd_launches * launch
        bwd = B * flops["bwd"] / gemm + (tiles * bwd_bytes + acc_bytes) / bw + bwd_launches * launch
    else:
        raise ValueError(f"no cost model for engine {engine!r}")
    return {"fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * (fwd + bwd)}


def cost_model_table(gpu: GPU = HOPPER) -> dict:
    """The table ``auto`` uses, from the cost model: the fastest engine for forward + backward
    at every (dtype, D, L) of the grid, batch TABLE_BATCH."""
    entries = []
    for dtype in TABLE_DTYPES:
        for D in TABLE_HEAD_DIMS:
            for L in TABLE_LENGTHS:
                preds = {eng: predict_ms(eng, dtype, TABLE_BATCH, L, D, gpu)["fwd_bwd_ms"] for eng in ENGINES}
                best = min(preds, key=preds.get)
                plain = predict_ms("plain", dtype, TABLE_BATCH, L, D, gpu)["fwd_bwd_ms"]
                entries.append({"dtype": dtype, "D": D, "L": L, "engine": best,
                                "predicted_ms": {k: round(v, 4) for k, v in preds.items()},
                                "predicted_plain_ms": round(plain, 4)})
    return {"source": f"cost model ({gpu.name}, batch {TABLE_BATCH}, forward + backward; an estimate)",
            "capability": list(gpu.capability), "entries": entries}


_TABLES: dict = {}


def load_table() -> dict:
    """The table in use: FASTNL_ENGINE_TABLE when set, else the committed cost-model table."""
    path = Path(os.environ.get("FASTNL_ENGINE_TABLE") or TABLE_PATH)
    key = str(path)
    if key not in _TABLES:
        try:
            table = json.loads(path.read_text())
            entries = table["entries"]
            if not all({"dtype", "D", "L", "engine"} <= set(e) for e in entries):
                raise KeyError("each entry needs dtype, D, L and engine")
            bad = sorted({e["engine"] for e in entries} - set(ENGINES))
            if bad:
                raise ValueError(f"unknown engines {bad}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"engine table {path} is unusable: {err}") from err
        _TABLES[key] = table
    return _TABLES[key]


_CHOICES: dict = {}


def choose(dtype: torch.dtype, head_dim: int, seq_len: int, capability: tuple | None = None) -> tuple[str, str]:
    """(engine, why) for ``auto`` on a CUDA device of ``capability``: the table's entry nearest to
    (D, L) on a log scale, for this dtype (looked up once per table and shape)."""
    key = (os.environ.get("FASTNL_ENGINE_TABLE") or str(TABLE_PATH), dtype, head_dim, seq_len,
           None if capability is None else tuple(capability))
    if key not in _CHOICES:
        _CHOICES[key] = _choose(load_table(), dtype, head_dim, seq_len, capability)
    return _CHOICES[key]


def _choose(table: dict, dtype: torch.dtype, head_dim: int, seq_len: int, capability) -> tuple[str, str]:
    name = dtype_name(dtype)
    entries = [e for e in table["entries"] if e["dtype"] == name]
    if not entries:
        return "chunked", f"no {name} entry in the engine table: the chunked engine"

    def distance(e):
        return (abs(math.log2(e["D"] / head_dim)), abs(math.log2(e["L"] / max(seq_len, 1))))

    best = min(entries, key=distance)
    where = f"{table.get('source', 'engine table')}"
    cap = table.get("capability")
    if capability is not None and cap is not None and tuple(cap) != tuple(capability):
        where += f"; made for capability {tuple(cap)}, this GPU is {tuple(capability)}"
    why = f"nearest table entry {name} D={best['D']} L={best['L']}: {best['engine']} ({where})"
    predicted = best.get("predicted_ms") or best.get("measured_ms")
    if predicted:
        why += " [" + ", ".join(f"{k} {v:.3g} ms" for k, v in predicted.items()) + "]"
    return best["engine"], why


def write_cost_model_table(path: Path = TABLE_PATH) -> None:
    path.write_text(json.dumps(cost_model_table(), indent=1) + "\n")


if __name__ == "__main__":
    write_cost_model_table()
    print(f"wrote {TABLE_PATH}")
