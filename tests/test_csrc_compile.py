"""The CUDA sources in csrc/ compile for sm_90 (Hopper) and no kernel spills registers.

Runs without a GPU: ``nvcc -cubin -Xptxas -v`` in a temporary directory, then the ptxas
resource report of every kernel is parsed.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
NVCC = shutil.which("nvcc")

pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here"),
    pytest.mark.skipif(torch.version.cuda is None, reason="this torch is a CPU-only build (no CUDA headers)"),
]

_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for 'sm_90'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_report(source, tmp_path):
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    cmd = [
        NVCC, "-cubin", "-o", str(tmp_path / "kernels.cubin"),
        "-gencode=arch=compute_90,code=sm_90", "-std=c++20", "-O3", "--use_fast_math",
        "-Xptxas", "-v", "-DFASTNL_WITH_CUDA", *cpp_extension.COMMON_NVCC_FLAGS,
        *includes, f"-I{os.path.join(ROOT, 'csrc')}", source,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-4000:]}"
    return proc.stderr


def _kernels(report):
    """{mangled kernel name: (registers, stack bytes, spill store bytes, spill load bytes)}."""
    kernels, current = {}, None
    for line in report.splitlines():
        if m := _FUNCTION.search(line):
            current = m.group(1)
        elif current and (m := _SPILL.search(line)):
            kernels[current] = [None, *map(int, m.groups())]
        elif current and (m := _REGS.search(line)):
            kernels[current][0] = int(m.group(1))
            current = None
    return kernels


@pytest.mark.slow
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm90_without_spills(source, tmp_path):
    kernels = _kernels(_ptxas_report(source, tmp_path))
    assert kernels, "ptxas reported no kernels"
    for name, (regs, stack, spill_stores, spill_loads) in kernels.items():
        assert regs is not None and regs <= 255, name
        assert (spill_stores, spill_loads) == (0, 0), f"{name} spills: {spill_stores} B stored, {spill_loads} B loaded"
        assert stack == 0, f"{name} uses {stack} B of stack"


def test_cuda_sources_exist():
    names = {os.path.basename(p) for p in CU_SOURCES}
    assert "channel_attention_cuda.cu" in names
    stems = [os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "csrc", "*.c*"))]
    assert len(stems) == len(set(stems)), f"sources of one extension need distinct stems: {sorted(stems)}"
