"""`fastnl bench`: kernel microbenchmarks, the NLAM block, a training step, and the capacity search."""
from __future__ import annotations

import datetime
import json
import os
import platform

NAME = "bench"
HELP = ("Benchmark fused vs reference: the attention and channel-attention kernels, the whole NLAM "
        "block and a training step of the model (median time, peak memory, speed-up and memory "
        "ratios); `fastnl bench capacity` searches the largest batch and the longest clips that train; "
        "`fastnl bench configs` times every Triton configuration the autotuner may pick (GPU); "
        "`fastnl bench memory` counts the memory of a training step on fake tensors (no GPU needed) "
        "and projects the largest N and batch within a budget; `fastnl bench step-cost` predicts, on fake "
        "tensors, the training step's time on an H100/H200 and what share the attention takes (an estimate); "
        "`fastnl bench loader` times the clip loaders.")
DEFAULT_SUITES = ("attention", "channel", "nlam", "model")
ALL = DEFAULT_SUITES + ("configs", "capacity", "memory", "step-cost", "loader")


def add_arguments(parser) -> None:
    parser.add_argument("what", nargs="*", metavar="SUITE",
                        help=f"any of {', '.join(ALL)} (default: {' '.join(DEFAULT_SUITES)})")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every row as JSON to FILE (rewritten after each row)")
    parser.add_argument("--engine-table", metavar="FILE", default=None,
                        help="after the attention suite on a GPU, write the engine table measured there "
                             "(the fastest engine per dtype, D, L); FASTNL_ENGINE_TABLE=FILE makes 'auto' use it")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for the capacity search's JSON and PNG (default: the current folder)")
    cap = parser.add_argument_group("capacity search")
    cap.add_argument("--target", choices=("model", "nlam"), default=None,
                     help="train the whole model or one NLAM block (default: model on CUDA, nlam on CPU)")
    cap.add_argument("--budget-mb", type=float, default=None,
                     help="memory budget (default: the whole GPU; 512 MB on CPU for nlam, 1024 for model)")
    cap.add_argument("--time-limit", type=float, default=None,
                     help="seconds for the whole search; it stops early with a bracket when reached")
    cap.add_argument("--max-frames", type=int, default=None, help="upper limit of the N search")
    cap.add_argument("--max-batch", type=int, default=None, help="upper limit of the batch search")
    mem = parser.add_argument_group("memory count (fastnl bench memory; --budget-mb: default 79872 = 78 GiB)")
    mem.add_argument("--frames", default=None, metavar="N,N,...",
                     help="clip lengths of the count at --batch (default 8,16,32,64,128,256; --quick: 4,8,16)")
    mem.add_argument("--batch", type=int, default=None, help="batch of the N series and the projection (default 8)")
    mem.add_argument("--batches", default=None, metavar="B,B,...",
                     help="batches of the count at N=8 for the largest-batch projection (default 8,16,32)")
    mem.add_argument("--resolution", default=None, metavar="HxW", help="input size (default 256x128)")
    mem.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None, help="autocast dtype (default bf16)")
    mem.add_argument("--grad-checkpoint", choices=("both", "on", "off"), default="both",
                     help="count with gradient checkpointing, without, or both (default)")
    mem.add_argument("--impl", choices=("both", "fused", "reference"), default="both", help="model variants")
    cost = parser.add_argument_group("step-cost (fastnl bench step-cost; an estimate for an H100/H200)")
    cost.add_argument("--launch-us", type=float, default=None, metavar="US",
                      help="the least time of any kernel, its launch and the gap to the next (default 4; the GPU "
                           "suite's environment.json measures it as launch.stream_us)")
    cost.add_argument("--measured", metavar="FILE", default=None,
                      help="a `fastnl bench model --json` report from a GPU (the suite's data/bench-nlam-model.json): "
                           "its training steps beside the prediction for the same batch, clip length and checkpointing")


def _parse_what(values) -> tuple:
    from fastnl.errors import UserError

    if not values:
        return DEFAULT_SUITES
    bad = [v for v in values if v not in ALL]
    if bad:
        raise UserError(f"unknown suite {', '.join(bad)}: choose from {', '.join(ALL)}")
    return tuple(dict.fromkeys(values))


def format_rows(name: str, rows: list[dict]) -> str:
    """The suite's own table (:func:`fastnl.benchmarks.load_table`); a plain one of every field
    when its rows do not fit it (a suite replaced in a test, rows of an older version)."""
    from fastnl import benchmarks

    try:
        return benchmarks.load_table(name)(rows)
    except (ImportError, KeyError, TypeError, ValueError):
        return benchmarks.generic_table(rows)


def environment(device: str) -> dict:
    import torch

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "host_cpu": platform.processor(),
            "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_mb=props.total_memory // 2**20,
                    cuda=torch.version.cuda, capability=[props.major, props.minor])
    else:
        info.update(device_name="cpu", capability=None)
    return info


def run(args) -> int:
    from fastnl.commands.check import resolve_device

    what = _parse_what(args.what)
    device = resolve_device(args.device)
    import torch

    from fastnl import benchmarks

    report = {"environment": environment(device), "quick": bool(args.quick), "suites": {}, "skipped": {}}
    print(f"fastnl bench on {device} ({report['environment']['device_name']}), torch {torch.__version__}"
          f"{', quick' if args.quick else ''}", flush=True)
    for name in what:
        if name == "capacity":
            continue
        try:
            suite = benchmarks.load_suite(name)
        except ImportError as err:
            report["skipped"][name] = str(err)
            print(f"\n== {name}: SKIP ({err})", flush=True)
            continue
        print(f"\n== {name}", flush=True)
        measured = report["suites"][name] = []

        def keep(row, measured=measured, name=name):
            # after every row: a suite stopped half-way (a time limit) keeps what it measured
            measured.append(row)
            if args.json:
                _write_json(args.json, {**report, "running": name})

        with benchmarks.row_sink(keep):
            if name == "memory":
                rows = suite(device, quick=args.quick, setting=memory_setting(args))
            elif name == "step-cost":
                rows = suite(device, quick=args.quick, **step_cost_setting(args))
            else:
                rows = suite(device, quick=args.quick)
        report["suites"][name] = rows
        print(format_rows(name, rows), flush=True)
        if name == "attention" and args.engine_table and device.startswith("cuda"):
            from fastnl.benchmarks.attention import measured_engine_table

            _write_json(args.engine_table, measured_engine_table(rows, report["environment"]))
            print(f"wrote the measured engine table {args.engine_table}", flush=True)
        if args.json:  # after every suite: a later one that runs out of time loses only itself
            _write_json(args.json, report)
    if "capacity" in what:
        report["capacity"] = run_capacity(args, device)
    if args.json:
        _write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


def _int_list(text: str, what: str) -> tuple:
    from fastnl.errors import UserError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UserError(f"{what} must be a comma-separated list of positive integers, got {text!r}")
    return values


def step_cost_setting(args) -> dict:
    """The ``step-cost`` suite's keyword arguments from the command line."""
    from fastnl.benchmarks import step_cost
    from fastnl.errors import UserError

    launch_us = getattr(args, "launch_us", None)
    if launch_us is not None and not launch_us >= 0:
        raise UserError(f"--launch-us must be a time in microseconds >= 0, got {launch_us}")
    measured = getattr(args, "measured", None)
    return {"launch_us": launch_us,
            "measured": step_cost.read_measured(measured) if measured else None}


def memory_setting(args):
    """The ``memory`` suite's setting from the command line (its defaults where not given)."""
    from fastnl.benchmarks import memory
    from fastnl.errors import UserError

    setting = memory.quick_setting() if args.quick else memory.Setting()
    if getattr(args, "frames", None):
        setting.frames = _int_list(args.frames, "--frames")
        if len(setting.frames) < 3:
            raise UserError(f"--frames needs at least 3 clip lengths for the fit a + bN + cN^2, got {args.frames!r}")
    if getattr(args, "batches", None):
        setting.batches = _int_list(args.batches, "--batches")
    if getattr(args, "batch", None):
        if args.batch < 1:
            raise UserError(f"--batch must be >= 1, got {args.batch}")
        setting.batch = args.batch
    if getattr(args, "resolution", None):
        try:
            h, w = (int(v) for v in args.resolution.lower().split("x"))
        except ValueError:
            h = w = 0
        if h < 32 or w < 32 or h % 32 or w % 32:
            raise UserError(f"--resolution must be HxW, multiples of 32 (e.g. 256x128), got {args.resolution!r}")
        setting.height, setting.width = h, w
    if getattr(args, "amp", None):
        setting.amp = args.amp
    if getattr(args, "budget_mb", None):
        setting.budget_mb = float(args.budget_mb)
    setting.grad_checkpoint = {"both": (False, True), "on": (True,), "off": (False,)}[
        getattr(args, "grad_checkpoint", None) or "both"]
    impl = getattr(args, "impl", None) or "both"
    setting.impls = memory.IMPLS if impl == "both" else (impl,)
    return setting


def run_capacity(args, device: str) -> dict:
    from fastnl.benchmarks import capacity

    plan = capacity.default_plan(device, quick=args.quick, budget_mb=args.budget_mb, target=args.target,
                                 time_limit=args.time_limit)
    if args.max_frames:
        plan.max_frames = args.max_frames
    if args.max_batch:
        plan.max_batch = args.max_batch
    s = plan.setting
    what = "the whole model" if s.target == "model" else f"one NLAM block (C={s.channels}, {s.height}x{s.width} maps)"
    budget = f"{s.budget_mb:.0f} MB budget" if s.budget_mb else "the whole device"
    print(f"\n== capacity: {what}, {s.height}x{s.width}, amp {s.amp}, {budget}; largest batch at N={plan.frames_at}, "
          f"largest N at batch {plan.batch_at}; one subprocess per probe, {plan.time_limit:.0f} s limit", flush=True)
    result = capacity.run_capacity(plan)
    print(capacity.format_table(result), flush=True)
    out = args.out or "."
    os.makedirs(out, exist_ok=True)
    tag = f"capacity-{'cuda' if device.startswith('cuda') else 'cpu'}-{s.target}"
    json_path = os.path.join(out, f"{tag}.json")
    _write_json(json_path, {"environment": environment(device), **result})
    png = capacity.plot(result, os.path.join(out, f"{tag}.png"))
    print(f"wrote {json_path}" + (f" and {png}" if png else " (no matplotlib: no plot)"))
    result["files"] = [p for p in (json_path, png) if p]
    return result


def _write_json(path: str, obj) -> None:
    from fastnl.errors import UserError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
