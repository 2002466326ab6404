"""Bookkeeping of bench/gpu_suite.sh: results.json, summary.md and tuned-configs.json.

Standard library only (it runs between the suite's steps, without importing torch). Every
write goes through a temporary file and a rename, so results.json and summary.md are whole,
valid files after every step, whatever stops the suite later.

    suite_record.py init OUTDIR KEY=VALUE...         a new results.json (and summary.md)
    suite_record.py start OUTDIR NAME CAP            the step is running (recorded before it runs)
    suite_record.py progress OUTDIR NAME --data FILE the rows the running step has written so far
    suite_record.py finish OUTDIR NAME STATUS SECONDS [--reason R] [--data FILE] [--log FILE]
    suite_record.py note OUTDIR TEXT
    suite_record.py tune OUTDIR DATA                 tuned-configs.json from a configs sweep
    suite_record.py done OUTDIR SECONDS

STATUS is ok, failed, timeout or skipped. DATA is what the step wrote: a `fastnl bench --json`
report (rows under "suites"), a `fastnl check --json` report or any JSON with "rows", or a
pytest JUnit XML file; its rows go into the step's entry of results.json, the rest under "data".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import xml.etree.ElementTree as ET

RESULTS, SUMMARY, TUNED = "results.json", "summary.md", "tuned-configs.json"


def clean(obj):
    """NaN and infinities as null: results.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def write_atomic(path: str, text: str) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(clean(obj), indent=1, allow_nan=False, default=str) + "\n")


def load(outdir: str) -> dict:
    with open(os.path.join(outdir, RESULTS)) as f:
        return json.load(f)


def save(outdir: str, results: dict) -> None:
    write_json(os.path.join(outdir, RESULTS), results)
    write_atomic(os.path.join(outdir, SUMMARY), render(results))


# --- what a step wrote -----------------------------------------------------------------------

def read_junit(path: str) -> tuple[list, dict]:
    """Counts of a pytest JUnit XML file, and one row per failed or erroring test."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = sum(float(s.get("time", 0) or 0) for s in suites)
    rows = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            for bad in case.findall(kind):
                message = (bad.get("message") or "").strip().splitlines()
                rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": kind,
                             "message": message[0][:300] if message else ""})
    return rows, counts


def read_data(path: str) -> tuple[list, dict]:
    """(rows, everything else) of a step's output file."""
    if path.endswith(".xml"):
        return read_junit(path)
    with open(path) as f:
        obj = json.load(f)
    rows = []
    if isinstance(obj, dict) and isinstance(obj.get("suites"), dict):
        for suite, suite_rows in obj["suites"].items():
            rows += [{"suite": suite, **r} for r in suite_rows]
        obj = {k: v for k, v in obj.items() if k != "suites"}
    if isinstance(obj, dict) and isinstance(obj.get("capacity"), dict):
        rows += [{"suite": "capacity", **r} for r in obj["capacity"].get("rows", [])]
        obj = {**obj, "capacity": {k: v for k, v in obj["capacity"].items() if k != "rows"}}
    if isinstance(obj, dict) and isinstance(obj.get("rows"), list):
        rows += obj["rows"]
        obj = {k: v for k, v in obj.items() if k != "rows"}
    return rows, obj


def last_line(path: str | None) -> str:
    """The last informative line of a log (a pytest count, an error), for the reason column."""
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("=") and any(w in ln for w in ("passed", "failed", "error", "skipped")):
            return ln.strip("= ")
    return lines[-1][:200] if lines else ""


# --- commands ---------------------------------------------------------------------------------

def cmd_init(args) -> None:
    header = {}
    for item in args.fields:
        key, _, value = item.partition("=")
        header[key] = int(value) if value.isdigit() else value
    save(args.outdir, {"suite": header, "notes": [], "steps": []})


def _entry(results: dict, name: str) -> dict:
    for step in results["steps"]:
        if step["name"] == name:
            return step
    step = {"name": name}
    results["steps"].append(step)
    return step


def cmd_start(args) -> None:
    results = load(args.outdir)
    _entry(results, args.name).update(status="running", cap_s=args.cap)
    save(args.outdir, results)


def cmd_progress(args) -> None:
    """The rows a running step has written so far (its status stays "running")."""
    try:
        rows, _ = read_data(args.data)
    except (OSError, ValueError, ET.ParseError):
        return  # being rewritten, or not written yet: the next look will do
    results = load(args.outdir)
    step = _entry(results, args.name)
    if step.get("status") == "running" and len(rows) != len(step.get("rows", [])):
        step["rows"] = rows
        save(args.outdir, results)


def cmd_finish(args) -> None:
    results = load(args.outdir)
    step = _entry(results, args.name)
    step.update(status=args.status, seconds=args.seconds)
    reason = args.reason or ""
    if args.data and os.path.exists(args.data):
        try:
            rows, data = read_data(args.data)
        except (OSError, ValueError, ET.ParseError) as err:
            rows, data = [], {"unreadable": f"{os.path.basename(args.data)}: {err}"}
        step["rows"] = rows
        if data:
            step["data"] = data
        if args.data.endswith(".xml") and data:
            counts = ", ".join(f"{data[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if data.get(k))
            reason = f"{reason}; {counts}" if reason else counts
    elif args.data and args.status != "skipped":
        step["rows"] = []
    if not reason and args.status != "ok":
        reason = last_line(args.log)
    if reason:
        step["reason"] = reason
    if args.log:
        step["log"] = args.log_name or os.path.basename(args.log)
    save(args.outdir, results)


def cmd_note(args) -> None:
    results = load(args.outdir)
    if args.text not in results["notes"]:
        results["notes"].append(args.text)
    save(args.outdir, results)


def cmd_done(args) -> None:
    results = load(args.outdir)
    results["suite"]["finished_s"] = args.seconds
    save(args.outdir, results)


def tuned_configs(report: dict) -> dict | None:
    """The fastest configuration per (kernel, dtype, L, D) of a `fastnl bench configs` report,
    in the format the kernels load; None without a timed configuration. A sweep cut short (its
    report still "running") leaves out the kernel and shape it was in the middle of."""
    env = report.get("environment", {})
    rows = [r for r in report.get("suites", {}).get("configs", []) if r.get("kind") == "config" and "kernel" in r]
    key = lambda row: (row["kernel"], row.get("dtype", "bf16"), row["L"], row["D"])  # noqa: E731
    unfinished = key(rows[-1]) if rows and report.get("running") == "configs" else None
    best = {}
    for row in rows:
        if not isinstance(row.get("ms"), (int, float)) or key(row) == unfinished:
            continue
        if key(row) not in best or row["ms"] < best[key(row)]["ms"]:
            best[key(row)] = row
    if not best:
        return None
    configs = [{"kernel": k[0], "dtype": k[1], "L": k[2], "D": k[3], "BLOCK_M": r["BLOCK_M"],
                "BLOCK_N": r["BLOCK_N"], "BLOCK_DV": r["BLOCK_DV"], "num_warps": r["warps"],
                "num_stages": r["stages"], "ms": r["ms"]} for k, r in sorted(best.items())]
    return {"gpu": env.get("device_name"), "capability": env.get("capability"), "triton": env.get("triton"),
            "torch": env.get("torch"), "configs": configs}


def cmd_tune(args) -> None:
    try:
        with open(args.data) as f:
            tuned = tuned_configs(json.load(f))
    except (OSError, ValueError) as err:
        tuned, why = None, f"no tuned configs: {err}"
    else:
        why = "no tuned configs: the sweep timed no configuration"
    results = load(args.outdir)
    step = _entry(results, "bench-configs")
    if tuned is None:
        step["tuned"] = why
    else:
        write_json(os.path.join(args.outdir, TUNED), tuned)
        step["tuned"] = f"{TUNED}: {len(tuned['configs'])} shapes"
    save(args.outdir, results)


# --- summary.md --------------------------------------------------------------------------------

# Columns shown in the summary per kind of row (every field stays in results.json).
COLUMNS = {
    "check": ["op", "shape", "dtype", "max_abs", "tol", "status", "note"],
    "attention": ["kind", "backend", "role", "B", "L", "D", "dtype", "keep_elements", "fwd_s", "fwd_bwd_s",
                  "fwd_bwd_p20_s", "fwd_bwd_p80_s", "fwd_tflops", "fwd_bwd_tflops", "fwd_bwd_peak_extra_mb",
                  "fwd_bwd_vs", "fwd_speedup", "fwd_bwd_speedup", "memory_vs_plain", "tflops", "refused"],
    "channel": ["op", "shape", "dtype", "pass", "backend", "ms", "p20_ms", "p80_ms", "gb_per_s", "floor_ratio",
                "speedup_vs_reference"],
    "nlam": ["case", "shape", "L", "amp", "reference_ms", "fused_ms", "speedup", "reference_peak_mb",
             "fused_peak_mb", "memory_ratio"],
    "model": ["case", "shape", "L", "amp", "grad_checkpoint", "reference_ms", "fused_ms", "speedup",
              "reference_peak_mb", "fused_peak_mb", "fused_clips_per_s", "reference_format", "fused_format"],
    "configs": ["kernel", "L", "D", "BLOCK_M", "BLOCK_N", "BLOCK_DV", "warps", "stages", "default", "ms",
                "p20_ms", "p80_ms", "vs_default", "refused"],
    "capacity": ["impl", "grad_checkpoint", "max_frames", "max_frames_failed", "max_frames_exact", "max_batch",
                 "max_batch_failed", "max_batch_exact"],
    "pytest": ["test", "outcome", "message"],
    "loader": ["backend", "decode", "workers", "batches", "batch_ms", "clips_per_s", "frames_per_s", "skipped"],
}


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value).replace("|", "/").replace("\n", " ")[:120]


def table(rows: list[dict], columns: list[str] | None) -> list[str]:
    present = [c for c in (columns or []) if any(c in r for r in rows)]
    if not present:
        present = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))[:10]
    lines = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in present) + " |" for r in rows]
    return lines


def kind_of(step_name: str, row: dict) -> str:
    if "suite" in row:
        return row["suite"]
    if step_name == "check":
        return "check"
    if step_name.startswith("pytest"):
        return "pytest"
    return step_name


def render(results: dict) -> str:
    s = results["suite"]
    steps = results["steps"]
    counts = {}
    for step in steps:
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    out = [f"# fastnl GPU suite: {s.get('gpu', '?')}", "",
           f"Started {s.get('started', '?')} on {s.get('host', '?')}, device `{s.get('device', '?')}`, "
           f"{s.get('commit', 'commit unknown')}; part {s.get('part', '?')}, budget {s.get('budget_s', '?')} s.", ""]
    state = (f"finished in {s['finished_s']} s" if "finished_s" in s else "still running (or stopped)")
    out += ["Result: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + f"; {state}.", "",
            "| step | result | seconds | cap | rows | reason |", "|---|---|---|---|---|---|"]
    for step in steps:
        rows = step.get("rows")
        out.append(f"| {step['name']} | {step['status']} | {fmt(step.get('seconds'))} | {fmt(step.get('cap_s'))} | "
                   f"{len(rows) if rows is not None else '-'} | {fmt(step.get('reason', ''))} |")
    if results.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    for step in steps:
        rows = step.get("rows") or []
        if not rows and "tuned" not in step:
            continue
        out += ["", f"## {step['name']}", ""]
        if "tuned" in step:
            out += [step["tuned"], ""]
        groups: dict[str, list] = {}
        for row in rows:
            groups.setdefault(kind_of(step["name"], row), []).append(row)
        for kind, group in groups.items():
            if len(groups) > 1:
                out += [f"{kind}:", ""]
            out += table(group, COLUMNS.get(kind)) + [""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init")
    p.add_argument("outdir")
    p.add_argument("fields", nargs="*", metavar="KEY=VALUE", help="the suite's header (GPU, commit, ...)")
    p = sub.add_parser("start")
    p.add_argument("outdir")
    p.add_argument("name")
    p.add_argument("cap", type=int)
    p = sub.add_parser("finish")
    p.add_argument("outdir")
    p.add_argument("name")
    p.add_argument("status", choices=("ok", "failed", "timeout", "skipped"))
    p.add_argument("seconds", type=int)
    p.add_argument("--reason", default="")
    p.add_argument("--data", default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--log-name", default=None, help="the log's name inside the tarball")
    p = sub.add_parser("progress")
    p.add_argument("outdir")
    p.add_argument("name")
    p.add_argument("--data", required=True)
    p = sub.add_parser("note")
    p.add_argument("outdir")
    p.add_argument("text")
    p = sub.add_parser("tune")
    p.add_argument("outdir")
    p.add_argument("data")
    p = sub.add_parser("done")
    p.add_argument("outdir")
    p.add_argument("seconds", type=int)
    args = parser.parse_args(argv)
    {"init": cmd_init, "start": cmd_start, "progress": cmd_progress, "finish": cmd_finish, "note": cmd_note,
     "tune": cmd_tune, "done": cmd_done}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
