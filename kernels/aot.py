"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.

``compile_config`` compiles one kernel in one configuration (default: Hopper, sm_90) and reports
its resource use: registers per thread and spill stack (from ``cuobjdump -res-usage`` on the
cubin) and shared memory (``metadata.shared``). ``compile_all`` does so for every configuration
the autotuner may pick plus the default one; ``compile_rows`` the chunked engine's row kernels,
``compile_batch_norm`` the BatchNorm kernels (the BatchNorm + ReLU op, the bottleneck end). Needs TRITON_INTERPRET=0 in the environment
before triton is imported (the interpreter replaces the compiler).

Run as ``python -m fastnl.kernels.aot --head-dims 512 1024 [--rows L ...] [--batch-norm]`` for a
JSON line per configuration.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from fastnl.vocabulary import triton_interpreted

from . import batch_norm, bn_se_tail, se_excite, softmax_rows
from .nl_attention import (KERNELS, PREPROCESS_BLOCK_M, candidate_configs, default_config, dk_block,
                           executed_flops, fuses_dq, keeps_q_on_chip)

H100_SHARED_BYTES = 232448  # 227 KB of shared memory per block on sm_90
_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Layout compiled: q, k, v channel-first ([B, C', L] transposed: stride over L is 1), every
# output and dO contiguous [B, L, D]; strides and L divisible by 16, as in the model.
_UNIT_STRIDES = {"stride_qm", "stride_kn", "stride_vn", "stride_od", "stride_dod", "stride_gd"}
_FP32_POINTERS = {"MZ", "DELTA", "DQACC", "S", "DP", "M", "Z"}
_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "P", "DS"} | _FP32_POINTERS


def cuobjdump_path() -> Path:
    """The cuobjdump shipped inside the triton wheel."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _signature(fn, dtype: str, constants: dict):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*fp32" if name in _FP32_POINTERS else "*" + _TYPES[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump_path()), flag, f.name], check=True, capture_output=True,
                              text=True).stdout


def uses_hgmma(cubin: bytes) -> bool:
    """Whether the SASS of ``cubin`` holds Hopper warpgroup MMA instructions (HGMMA)."""
    return "HGMMA" in _cuobjdump(cubin, "-sass")


def res_usage(cubin: bytes) -> dict:
    """{"reg", "stack", "local"} of the (single) function in ``cubin``, from cuobjdump -res-usage."""
    text = _cuobjdump(cubin, "-res-usage")
    usage = {}
    for field in ("REG", "STACK", "LOCAL"):
        match = re.search(rf"\b{field}:(\d+)", text)
        if match is None:
            raise RuntimeError(f"cuobjdump -res-usage printed no {field}: {text!r}")
        usage[field.lower()] = int(match.group(1))
    return usage


def _compile(fn, dtype: str, constants: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """Compile ``fn`` with these constexprs for ``sm_<arch>``: shared memory, registers, spill
    stack, whether it uses HGMMA, compile seconds."""
    if triton_interpreted():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET=0 before triton is imported")
    constants = dict(constants)
    for name in _UNIT_STRIDES & set(fn.arg_names):
        constants[name] = 1
    signature, attrs = _signature(fn, dtype, constants)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    src = triton.compiler.ASTSource(fn, signature, constants, attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    cubin = compiled.asm["cubin"]
    return {"shared": compiled.metadata.shared, **res_usage(cubin), "hgmma": uses_hgmma(cubin),
            "compile_s": round(seconds, 2)}


# The sequence length at which a configuration's executed work is reported (the ratios do not
# depend on it: the kernels tile every L the same way).
_FLOPS_SEQ_LEN = 1024


def compile_config(kernel: str, head_dim: int, dtype: str, meta: dict, num_warps: int, num_stages: int,
                   arch: int = 90) -> dict:
    """Compile ``kernel`` ("fwd", "dkdv", "dq", "preprocess") for ``sm_<arch>``; returns its resources
    and, for fwd / dkdv / dq, the executed over useful flops of the pass it belongs to (forward, or
    backward with the other backward kernel at its default) as ``executed_over_useful``."""
    fn = KERNELS[kernel]
    constants = {"HEAD_DIM": head_dim, "BLOCK_DK": dk_block(head_dim), **meta}
    if kernel != "preprocess":
        constants.update(PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    if kernel == "dkdv":
        constants["FUSE_DQ"] = fuses_dq(head_dim)
    result = {"kernel": kernel, "head_dim": head_dim, "dtype": dtype, **meta, "num_warps": num_warps,
              "num_stages": num_stages, "arch": arch, **_compile(fn, dtype, constants, num_warps, num_stages, arch)}
    if kernel != "preprocess":
        flops = executed_flops(_FLOPS_SEQ_LEN, head_dim, {kernel: meta["BLOCK_DV"]})
        result["executed_over_useful"] = flops["fwd_ratio" if kernel == "fwd" else "bwd_ratio"]
    if kernel == "fwd":
        result["q_on_chip"] = keeps_q_on_chip(head_dim, meta["BLOCK_DV"])
    return result


ROW_SEQ_LENS = (256, 1024, 8192, 32768)  # the model's L at N = 8 (layer4, layer3), 64 and 256 frames


def compile_rows(seq_len: int, dtype: str = "bf16", arch: int = 90) -> list[dict]:
    """Compile the chunked engine's two row kernels (``softmax_rows``) at L = seq_len for
    ``sm_<arch>``, P and dS in ``dtype``; they do no matmuls (no HGMMA expected)."""
    out = []
    variants = (("rows_fwd", softmax_rows.fwd_meta(seq_len)),
                ("rows_bwd", {**softmax_rows.bwd_meta(seq_len), "FROM_P": False}),
                ("rows_bwd", {**softmax_rows.bwd_meta(seq_len), "FROM_P": True}))
    for kernel, meta in variants:
        meta = dict(meta)
        warps = meta.pop("num_warps")
        res = _compile(softmax_rows.KERNELS[kernel], dtype, meta, warps, 1, arch)
        out.append({"kernel": kernel, "seq_len": seq_len, "dtype": dtype, **meta, "num_warps": warps,
                    "num_stages": 1, "arch": arch, **res})
    return out


# The BatchNorm + ReLU kernels' tiles in the two layouts (``batch_norm.blocks`` of SE-ResNet50's
# maps): contiguous (positions contiguous) and channels_last (channels contiguous).
BN_LAYOUTS = {"contiguous": ({"sS": 1, "dS": 1}, (256, 64, 64, 32)),
              "channels_last": ({"sC": 1, "dC": 1}, (256, 64, 64, 32))}
_BN_DATA_POINTERS = {"X", "Y", "DY", "DX", "R", "DR", "DSQ", "SQUEEZE", "GATE", "DGATE"}
_BN_SIZES = {"N", "C", "S", "T", "NSB", "G", "K"}  # the integer sizes (upper case like the pointers)
# the bottleneck end's kernels over [N, C] rows, and the constant naming their (BLOCK_N, BLOCK_C)
SMALL_BN_KERNELS = {"se_tail_bwd_coefs": "COEF_BLOCKS", "bn_pool_finish": "POOL_BLOCKS"}
# constexpr switches of the bottleneck end's kernels, (the common value, the other): both are
# compiled (a normalised shortcut, NORM_R, loads more per element; HAS_GATE=False is the
# shortcut BatchNorm's coefficients)
BN_VARIANTS = {"NORM_R": (False, True), "HAS_GATE": (True, False)}


def batch_norm_variants(fn) -> list[dict]:
    """The constexpr switches to compile ``fn`` with: ``{}`` for a kernel without any, else its
    common setting and each other one (:data:`BN_VARIANTS`)."""
    flags = [name for name in BN_VARIANTS if name in fn.arg_names]
    if not flags:
        return [{}]
    common = {name: BN_VARIANTS[name][0] for name in flags}
    return [common] + [{**common, name: BN_VARIANTS[name][1]} for name in flags]


def _bn_signature(fn, dtype: str, constants: dict):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.isupper() and name not in _BN_SIZES:  # pointers
            signature[name] = "*" + _TYPES[dtype] if name in _BN_DATA_POINTERS else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "count", "positions"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, attrs


def batch_norm_kernels() -> dict:
    """The BatchNorm kernels by name: the six of the BatchNorm + ReLU op (``batch_norm``), then
    the five of the bottleneck end (``bn_se_tail``; its statistics are ``bn_stats_partial``'s
    with tile sums, the variant compiled here)."""
    return {**batch_norm.KERNELS, **bn_se_tail.KERNELS}


def compile_batch_norm(dtype: str = "bf16", arch: int = 90) -> list[dict]:
    """Compile the BatchNorm kernels (:func:`batch_norm_kernels`) for ``sm_<arch>`` in both
    layouts, the maps and their gradients in ``dtype``, with the tiles ``batch_norm.blocks`` picks
    for an SE-ResNet50 layer1 map (256 channels, 64 x 32)."""
    out = []
    for layout, (unit, (channels, height, width, batch)) in BN_LAYOUTS.items():
        x = torch.empty((batch, channels, height, width), device="meta")
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        block_c, block_s = batch_norm.blocks(x)
        for kernel, fn, variant in [(k, f, v) for k, f in batch_norm_kernels().items()
                                    for v in batch_norm_variants(f)]:
            constants = {name: value for name, value in unit.items() if name in fn.arg_names}
            constants.update(variant)
            for name, value in (("BLOCK_C", block_c), ("BLOCK_S", block_s), ("INTERPRETED", False),
                                ("TILE_SUMS", True)):
                if name in fn.arg_names:
                    constants[name] = value
            if kernel.endswith("finalize"):  # the partials of an H100's 132 multiprocessors
                tiles = batch * triton.cdiv(height * width, block_s)
                partials = batch_norm.reduction_programs(132, triton.cdiv(channels, block_c), tiles)
                constants["BLOCK_G"], constants["BLOCK_C"] = batch_norm.finalize_blocks(channels, partials)
            if kernel in SMALL_BN_KERNELS:  # [N, C] tensors: their own tiles, any layout alike
                constants["BLOCK_N"], constants["BLOCK_C"] = getattr(bn_se_tail, SMALL_BN_KERNELS[kernel])
            signature, attrs = _bn_signature(fn, dtype, constants)
            target = GPUTarget("cuda", arch, 32)
            backend = triton.compiler.make_backend(target)
            warps = bn_se_tail.NORM_R_PARTIAL_WARPS if kernel == "se_tail_bwd_partial" and variant.get("NORM_R") else 4
            options = backend.parse_options({"num_warps": warps, "num_stages": 1})
            start = time.perf_counter()
            compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constants, attrs), target=target,
                                      options=options.__dict__)
            cubin = compiled.asm["cubin"]
            other = {name: value for name, value in variant.items() if value != BN_VARIANTS[name][0]}
            out.append({"kernel": kernel, "layout": layout, "variant": ",".join(f"{k}={v}" for k, v in other.items()),
                        "dtype": dtype, "BLOCK_C": constants.get("BLOCK_C"),
                        "BLOCK_S": constants.get("BLOCK_S"), "BLOCK_G": constants.get("BLOCK_G"),
                        "BLOCK_N": constants.get("BLOCK_N"), "num_warps": warps,
                        "arch": arch,
                        "shared": compiled.metadata.shared, **res_usage(cubin),
                        "compile_s": round(time.perf_counter() - start, 2)})
    return out


# the SE excitation's pointers in the maps' dtype (the others float32) and its integer sizes
_SE_DATA_POINTERS = {"SQ", "W1", "B1", "W2", "B2", "GATE", "DGATE", "DSQ", "DW1", "DB1", "DW2", "DB2"}
_SE_SIZES = {"N", "C", "R"}
# SE-ResNet50's reduced units (C / 16 at C = 256 .. 2048): the tiles the kernels take for them
SE_BLOCK_RS = (16, 32, 64, 128)


def compile_se_excite(dtype: str = "bf16", arch: int = 90) -> list[dict]:
    """Compile the SE excitation's kernels (``se_excite``) for ``sm_<arch>`` at every reduced
    width SE-ResNet50 has, the squeeze and the weights in ``dtype`` (a half-precision one)."""
    out = []
    for kernel, fn in se_excite.KERNELS.items():
        for block_r in SE_BLOCK_RS:
            block_c, _ = se_excite.blocks(block_r)
            constants = {"BLOCK_N": se_excite.BLOCK_N, "BLOCK_C": block_c, "BLOCK_R": block_r}
            if "INTERPRETED" in fn.arg_names:
                constants["INTERPRETED"] = False
            signature, attrs = {}, {}
            for i, name in enumerate(fn.arg_names):
                if name in constants:
                    signature[name] = "constexpr"
                elif name in _SE_SIZES:
                    signature[name] = "i32"
                else:
                    signature[name] = "*" + _TYPES[dtype] if name in _SE_DATA_POINTERS else "*fp32"
                    attrs[(i,)] = [["tt.divisibility", 16]]
            target = GPUTarget("cuda", arch, 32)
            options = triton.compiler.make_backend(target).parse_options({"num_warps": 4, "num_stages": 1})
            start = time.perf_counter()
            compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constants, attrs), target=target,
                                      options=options.__dict__)
            cubin = compiled.asm["cubin"]
            out.append({"kernel": kernel, "dtype": dtype, "BLOCK_C": block_c, "BLOCK_R": block_r, "num_warps": 4,
                        "arch": arch,
                        "shared": compiled.metadata.shared, **res_usage(cubin), "hgmma": uses_hgmma(cubin),
                        "compile_s": round(time.perf_counter() - start, 2)})
    return out


def configurations(head_dim: int, dtype: str = "bf16") -> list[tuple[str, dict, int, int]]:
    """(kernel, meta, num_warps, num_stages) for every configuration the autotuner may pick at
    ``head_dim`` for ``dtype`` inputs, and the defaults, without duplicates."""
    torch_dtype = _TORCH_DTYPES[dtype]
    out = [("preprocess", {"BLOCK_M": PREPROCESS_BLOCK_M}, 4, 3)]
    for kernel in ("fwd", "dkdv", "dq"):
        for config in [default_config(kernel, head_dim, torch_dtype),
                       *candidate_configs(kernel, head_dim, dtype=torch_dtype)]:
            entry = (kernel, dict(config.kwargs), config.num_warps, config.num_stages)
            if entry not in out:
                out.append(entry)
    return out


def compile_all(head_dims=(512, 1024), dtypes=("bf16",), arch: int = 90):
    """Yield ``compile_config`` results for every configuration at each head dim and dtype."""
    for head_dim in head_dims:
        for dtype in dtypes:
            for kernel, meta, warps, stages in configurations(head_dim, dtype):
                yield compile_config(kernel, head_dim, dtype, meta, warps, stages, arch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compile the Triton kernels ahead of time; one JSON line each")
    parser.add_argument("--head-dims", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(_TYPES))
    parser.add_argument("--rows", type=int, nargs="*", default=[], metavar="L",
                        help="also the chunked engine's row kernels at these sequence lengths")
    parser.add_argument("--batch-norm", action="store_true", help="also the BatchNorm kernels (BatchNorm + ReLU, the bottleneck end)")
    parser.add_argument("--se-excite", action="store_true", help="also the SE excitation's kernels")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    for result in compile_all(args.head_dims, args.dtypes, args.arch):
        print(json.dumps(result), flush=True)
    for seq_len in args.rows:
        for dtype in args.dtypes:
            for result in compile_rows(seq_len, dtype, args.arch):
                print(json.dumps(result), flush=True)
    if args.batch_norm:
        for dtype in args.dtypes:
            for result in compile_batch_norm(dtype, args.arch):
                print(json.dumps(result), flush=True)
    if args.se_excite:
        for dtype in args.dtypes:
            for result in compile_se_excite(dtype, args.arch):
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
