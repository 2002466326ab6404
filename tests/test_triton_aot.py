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


def compile_ahead_of_time(head_dim: int, dtype: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "--head-dims", str(head_dim), "--dtypes", dtype],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# bf16 at every head dim the model has (D = C/2 after blocks 1..5: 32, 128, 256, 512, 1024; at
# 32 and 128 the chunks are clipped to D); fp32 uses its own smaller tiles; fp16 compiles to
# the same code shape as bf16.
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
