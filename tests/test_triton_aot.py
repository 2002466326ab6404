"""GPU readiness without a GPU: every kernel configuration the autotuner may pick (and the
default one) compiles ahead of time for Hopper (sm_90), fits its 227 KB of shared memory and
does not spill registers (cuobjdump -res-usage reports STACK 0).

Compilation runs in a subprocess with TRITON_INTERPRET=0 (this process runs the interpreter).
Triton's on-disk cache makes reruns fast.
"""
import json
import os
import subprocess
import sys

import pytest

from fastnl._paths import REPO_ROOT

H100_SHARED_BYTES = 232448

SCRIPT = """
import importlib, sys
from fastnl._paths import import_kernels
import_kernels()
importlib.import_module("fastnl.kernels.aot").main(sys.argv[1:])
"""


def compile_ahead_of_time(head_dim, dtype: str, rows=(), batch_norm=False, se_excite=False) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    dims = [] if head_dim is None else [str(head_dim)]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "--head-dims", *dims, "--dtypes", dtype,
                           "--rows", *map(str, rows), *(["--batch-norm"] if batch_norm else []),
                           *(["--se-excite"] if se_excite else [])],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# bf16 at every head dim the model has (D = C/2 after blocks 1..5: 32, 128, 256, 512, 1024; at
# 32 and 128 the chunks are clipped to D); fp32 uses its own smaller tiles; fp16 compiles to
# the same code shape as bf16.
@pytest.mark.slow
@pytest.mark.parametrize("head_dim,dtype", [(32, "bf16"), (128, "bf16"), (256, "bf16"), (512, "bf16"),
                                            (1024, "bf16"), (32, "fp32"), (512, "fp32")])
def test_every_configuration_compiles_for_sm90_without_spills(head_dim, dtype):
    from fastnl._paths import import_kernels

    nla = import_kernels().nl_attention
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    results = compile_ahead_of_time(head_dim, dtype)
    expected = 1 + sum(len({(tuple(c.kwargs.items()), c.num_warps, c.num_stages) for c in
                            [nla.default_config(k, head_dim, torch_dtype),
                             *nla.candidate_configs(k, head_dim, dtype=torch_dtype)]})
                       for k in ("fwd", "dkdv", "dq"))
    assert len(results) == expected
    assert {r["kernel"] for r in results} == {"preprocess", "fwd", "dkdv", "dq"}
    for r in results:
        label = {k: r[k] for k in r if k not in ("shared", "reg", "stack", "local", "compile_s")}
        assert r["shared"] <= H100_SHARED_BYTES, label
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {r}"
        assert 0 < r["reg"] <= 255, label
        if r["kernel"] != "preprocess":
            # tensor cores (Hopper warpgroup MMA) for half-precision inputs; fp32 multiplies in fp32
            assert r["hgmma"] == (dtype != "fp32"), label
            flops = nla.executed_flops(1024, head_dim, {r["kernel"]: r["BLOCK_DV"]})
            assert r["executed_over_useful"] == flops["fwd_ratio" if r["kernel"] == "fwd" else "bwd_ratio"] >= 1
        if r["kernel"] == "fwd":
            # one chunk over D <= 256: Q is loaded once and stays on chip for the whole key loop
            assert r["q_on_chip"] == (r["BLOCK_DV"] >= head_dim and head_dim <= 256), label
    defaults = [r for r in results if r["kernel"] == "fwd" and r["BLOCK_DV"] == nla.default_config(
        "fwd", head_dim, torch_dtype).kwargs["BLOCK_DV"]]
    assert defaults, "the default forward configuration was compiled"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_row_kernels_of_the_chunked_engine_compile_without_spills(dtype):
    from fastnl._paths import import_kernels

    rows = import_kernels().softmax_rows
    lengths = (256, 1024, 8192, 16384, 32768)  # one pass up to 16384 columns, two passes beyond
    results = compile_ahead_of_time(None, dtype, rows=lengths)
    assert [(r["kernel"], r["seq_len"]) for r in results] == \
        [(k, L) for L in lengths for k in ("rows_fwd", "rows_bwd", "rows_bwd")]
    for r in results:
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {r}"
        assert r["shared"] <= H100_SHARED_BYTES and 0 < r["reg"] <= 255 and not r["hgmma"], r
        if r["kernel"] == "rows_fwd":
            assert r["ONE_PASS"] == (r["seq_len"] <= rows.ONE_PASS_MAX), r


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_se_excitation_kernels_compile_without_spills(dtype):
    """The SE excitation's three kernels at every reduced width of SE-ResNet50 (16 to 128), in
    both half precisions: no spill, at most 128 registers a thread, weight tiles of
    ``WEIGHT_TILE`` elements (16-image tiles: the products run as mma.sync, not warpgroup MMA)."""
    from fastnl._paths import import_kernels

    kernels = import_kernels()
    results = compile_ahead_of_time(None, dtype, se_excite=True)
    assert [(r["kernel"], r["BLOCK_R"]) for r in results] == \
        [(k, r) for k in kernels.se_excite.KERNELS for r in (16, 32, 64, 128)]
    for r in results:
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {r}"
        assert r["shared"] <= H100_SHARED_BYTES and 0 < r["reg"] <= 128, r
        assert r["BLOCK_C"] * r["BLOCK_R"] == kernels.se_excite.WEIGHT_TILE or r["BLOCK_C"] == 16, r


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_batch_norm_kernels_compile_without_spills(dtype):
    from fastnl._paths import import_kernels

    kernels = import_kernels()
    bn = kernels.batch_norm
    results = compile_ahead_of_time(None, dtype, batch_norm=True)
    # the bottleneck end's kernels also with a normalised shortcut, and its coefficients without
    # a gate (the shortcut BatchNorm's)
    others = {"se_tail_fwd": ["NORM_R=True"], "se_tail_bwd_partial": ["NORM_R=True"],
              "se_tail_bwd_coefs": ["HAS_GATE=False"]}
    assert [(r["kernel"], r["layout"], r["variant"]) for r in results] == \
        [(k, layout, v) for layout in ("contiguous", "channels_last") for k in [*bn.KERNELS, *kernels.bn_se_tail.KERNELS]
         for v in ["", *others.get(k, [])]]
    for r in results:
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {r}"
        assert r["shared"] <= H100_SHARED_BYTES and 0 < r["reg"] <= 128, r
        if r["kernel"] in ("se_tail_bwd_coefs", "bn_pool_finish"):  # [N, C] tiles, the channels 128 bytes
            blocks = {"se_tail_bwd_coefs": kernels.bn_se_tail.COEF_BLOCKS,
                      "bn_pool_finish": kernels.bn_se_tail.POOL_BLOCKS}[r["kernel"]]
            assert (r["BLOCK_N"], r["BLOCK_C"]) == blocks and r["BLOCK_C"] * 4 >= 128, r
        elif not r["kernel"].endswith("finalize"):  # a tile of TILE elements, the contiguous side long
            assert r["BLOCK_C"] * r["BLOCK_S"] == bn.TILE, r
            assert (r["BLOCK_S"] if r["layout"] == "contiguous" else r["BLOCK_C"]) >= 128, r
