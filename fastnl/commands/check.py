"""`fastnl check`: every fused op against the plain PyTorch reference, forward and gradients."""
from __future__ import annotations

import json
import os
import sys

NAME = "check"
HELP = ("Check the fused kernels (Triton attention, chunked attention, C++/CUDA channel attention, "
        "the whole NLAM and the whole model) against the plain PyTorch reference on random inputs, "
        "forward and gradients; tolerances come from the reference's own error in each dtype vs a "
        "float64 run. Exit code 1 on any FAIL.")


def add_arguments(parser) -> None:
    from fastnl.checking import DTYPES, OPS, SIZES

    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help=f"comma-separated subset of {','.join(DTYPES)} "
                             "(default: all on CUDA, float32,bfloat16 on CPU)")
    parser.add_argument("--size", choices=SIZES, default=None,
                        help="shapes: the paper's (real), scaled down for a CPU (small) or minimal (tiny); "
                             "default real on CUDA, small on CPU")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON to FILE (rewritten after each row)")


def _parse_list(value: str, allowed, what: str) -> tuple:
    from fastnl.errors import UserError

    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UserError(f"unknown {what} {','.join(bad) or repr(value)}: choose from {','.join(allowed)}")
    return items


def resolve_device(name: str | None) -> str:
    """``--device`` as a string (cpu, cuda, cuda:N): :func:`fastnl.runtime.resolve_device`."""
    from fastnl.runtime import resolve_device as resolve

    return str(resolve(name))


def run(args) -> int:
    device_arg = args.device
    if (device_arg or "cpu") == "cpu" and "fastnl.kernels" not in sys.modules:
        # Without a GPU the Triton kernels run under the interpreter; it must be on before
        # triton decorates them (nothing has imported them yet in this process).
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if device_arg == "cpu" or not has_cuda:
            from fastnl.vocabulary import request_triton_interpreter

            request_triton_interpreter()

    import torch

    from fastnl import checking

    device = resolve_device(device_arg)
    on_cuda = device.startswith("cuda")
    default_dtypes = "float32,float16,bfloat16" if on_cuda else "float32,bfloat16"
    dtype_names = _parse_list(args.dtype or default_dtypes, tuple(checking.DTYPES), "dtype")
    ops = _parse_list(args.ops, checking.OPS, "op")
    size = args.size or ("real" if on_cuda else "small")
    if on_cuda:
        # The references run in full float32: TF32 would make them a looser baseline.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if on_cuda else "CPU"
    print(f"fastnl check on {device} ({name}), torch {torch.__version__}, {size} shapes, "
          f"dtypes {','.join(dtype_names)}")
    print(f"per tensor, element-wise: max|fused - float64| <= {checking.FACTOR:g} x max|reference in dtype - "
          f"float64| + {checking.FLOOR_ULPS:g} eps(dtype) x max|float64|;")
    print(f"norm-wise: ||fused - float64|| / ||float64|| <= {checking.FACTOR:g} x ||reference in dtype - float64|| "
          f"/ ||float64|| + {checking.FLOOR_ULPS:g} eps(dtype); a row shows its worst tensor")
    print(checking.format_header(), flush=True)
    header = {"device": device, "device_name": name, "torch": torch.__version__, "size": size}
    done = []

    def progress(result) -> None:
        print(checking.format_row(result), flush=True)
        done.append(result)
        if args.json:  # after every row: a check stopped by a time limit keeps what it checked
            _write_json(args.json, {**header, "running": True, "rows": [r.as_dict() for r in done]})

    results = checking.run_all(device, [checking.DTYPES[d] for d in dtype_names], size, ops, seed=args.seed,
                               progress=progress)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    if args.json:
        _write_json(args.json, {**header, "rows": [r.as_dict() for r in results]})
    return 1 if counts["FAIL"] else 0


def _write_json(path: str, obj) -> None:
    """Write ``obj`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
    os.replace(tmp, path)
