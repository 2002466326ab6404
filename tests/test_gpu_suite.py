"""bench/gpu_suite.sh on the CPU (its dry run): what comes back from a GPU machine must fit the
rules of the machines that run it (at most 8 files, at most two folders deep, 16 MiB each), be
valid after every step, and survive a step that runs out of time."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.sh"
OUTPUTS = {"summary.md", "results.json", "tuned-configs.json", "logs.tar.gz"}


def _record_module():
    spec = importlib.util.spec_from_file_location("suite_record", ROOT / "bench" / "suite_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_suite(out: Path, *args, timeout=600, suite=SUITE, **env):
    full_env = dict(os.environ, PYTHON=sys.executable, FASTNL_SUITE_DEVICE="cpu", **env)
    return subprocess.run(["bash", str(suite), str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (not JSON)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def check_output_rules(out: Path) -> None:
    """What the GPU machines bring back: at most 8 files, depth <= 2, each < 16 MiB."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert {p.name for p in files} <= OUTPUTS, files
    for p in files:
        assert len(p.relative_to(out).parts) <= 3  # the file itself at most two folders below OUTDIR
        assert p.stat().st_size < 16 * 2**20


@pytest.mark.slow
def test_dry_run_keeps_its_rules_and_survives_a_timed_out_step(tmp_path):
    out = tmp_path / "returned"
    steps = "check sanitizer-memcheck bench-attention bench-channel pytest-rest bench-configs"  # as they run
    sanitizer = fake_sanitizer(tmp_path, "echo '========= Error: Device not supported'; exit 1")
    proc = run_suite(out, "--steps", steps, "--budget", "400", FASTNL_SUITE_CAPS="check=2",
                     FASTNL_SUITE_COMMIT="abc1234", FASTNL_SUITE_SANITIZER=sanitizer)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # a timeout is not fatal
    check_output_rules(out)
    assert {p.name for p in out.iterdir()} == OUTPUTS

    results = strict_json((out / "results.json").read_text())
    names = [s["name"] for s in results["steps"]]
    assert names == ["environment", "extension-build", *steps.split()]
    status = {s["name"]: s for s in results["steps"]}
    assert status["check"]["status"] == "timeout" and "2s cap" in status["check"]["reason"]
    assert status["check"]["cap_s"] == 2
    memcheck = status.pop("sanitizer-memcheck")  # a refused device is that step's business only
    assert memcheck["status"] == "skipped" and "Device not supported" in memcheck["reason"]
    for name in status:  # the steps after the timed-out one still ran
        if name != "check":
            assert status[name]["status"] == "ok", status[name]
    assert results["suite"]["commit"] == "commit abc1234"
    assert results["suite"]["finished_s"] < 400

    attention = status["bench-attention"]["rows"]
    # on a CPU, per shape: the torch engine, plain and every SDPA backend (efficient and cuDNN refuse)
    assert len(attention) == 2 * 6 and all(r["suite"] == "attention" for r in attention)
    assert all(r["fwd_s"] > 0 for r in attention if r["backend"] not in ("sdpa-efficient", "sdpa-cudnn"))
    assert all("refused" in r for r in attention if r["backend"] in ("sdpa-efficient", "sdpa-cudnn"))
    # per quick shape (2 of each op, float32 on a CPU): forward and both, extension and reference
    channel_ops = [r["op"] for r in status["bench-channel"]["rows"]]
    assert channel_ops == ["channel_attention"] * 8 + ["se_residual_relu"] * 8
    assert status["pytest-rest"]["data"]["passed"] > 0 and status["pytest-rest"]["data"]["failures"] == 0

    # tuned-configs.json: the fastest swept configuration of each kernel and shape
    sweep = [r for r in status["bench-configs"]["rows"] if "ms" in r]
    tuned = strict_json((out / "tuned-configs.json").read_text())
    assert set(tuned) == {"gpu", "capability", "triton", "torch", "configs"}
    assert sorted(c["kernel"] for c in tuned["configs"]) == ["dkdv", "dq", "fwd"]
    for c in tuned["configs"]:
        assert set(c) == {"kernel", "dtype", "L", "D", "BLOCK_M", "BLOCK_N", "BLOCK_DV", "num_warps",
                          "num_stages", "ms"}
        mine = [r for r in sweep if r["kernel"] == c["kernel"]]
        assert len(mine) > 1 and c["ms"] == min(r["ms"] for r in mine)
        best = min(mine, key=lambda r: r["ms"])
        assert (c["BLOCK_M"], c["num_warps"], c["dtype"]) == (best["BLOCK_M"], best["warps"], "bf16")

    summary = (out / "summary.md").read_text()
    assert "| check | timeout | " in summary and "| bench-configs | ok | " in summary
    assert "commit abc1234" in summary

    # the tarball: a log per step, and results.json as it was after each step, valid every time
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
        for name in names:
            assert f"logs/{name}.log" in members
        snaps = sorted(n for n in members if n.startswith("snapshots/"))
        assert len(snaps) == len(names)
        for i, name in enumerate(snaps, start=1):
            snap = strict_json(tar.extractfile(members[name]).read().decode())
            assert [s["name"] for s in snap["steps"]] == names[:i]
            assert snap["steps"][-1]["status"] != "running"

    # unpacked into bench/results/<date>-<gpu>/ (a run of chosen steps: its part-custom/), no snapshots
    proc = subprocess.run(["bash", str(ROOT / "bench" / "unpack_results.sh"), str(out), str(tmp_path / "results")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "results" / f"{results['suite']['date']}-cpu-dry-run" / "part-custom"
    assert (dest / "results.json").read_text() == (out / "results.json").read_text()
    assert (dest / "tuned-configs.json").exists() and (dest / "logs" / "check.log").exists()
    assert (dest / "data" / "bench-attention.json").exists() and not (dest / "snapshots").exists()


def test_steps_beyond_the_budget_are_skipped_and_recorded(tmp_path):
    copy = tmp_path / "copy" / "bench"  # a copy without .git, as on the GPU machines
    copy.mkdir(parents=True)
    for name in ("gpu_suite.sh", "suite_record.py"):
        shutil.copy(ROOT / "bench" / name, copy / name)
    out = tmp_path / "returned"
    proc = run_suite(out, "--steps", "loader", "--budget", "1", suite=copy / "gpu_suite.sh")
    assert proc.returncode == 0, proc.stderr
    check_output_rules(out)
    results = strict_json((out / "results.json").read_text())
    assert [(s["name"], s["status"]) for s in results["steps"]] == [
        ("environment", "skipped"), ("extension-build", "skipped"), ("loader", "skipped")]
    assert all("no time left in the 1s budget" in s["reason"] for s in results["steps"])
    assert results["suite"]["commit"] == "commit unknown (no .git)"
    assert "commit unknown (no .git)" in (out / "summary.md").read_text()
    assert not (out / "tuned-configs.json").exists()


@pytest.mark.slow
def test_earlier_steps_leave_capacity_its_share_of_the_budget(tmp_path):
    out = tmp_path / "returned"
    # 130 s less the final 15 s leaves nothing beyond capacity's 120 s for the steps before it
    proc = run_suite(out, "--steps", "capacity", "--budget", "130", FASTNL_SUITE_CAPS="capacity=1")
    assert proc.returncode == 0, proc.stderr
    steps = [(s["name"], s["status"], s.get("cap_s")) for s in strict_json((out / "results.json").read_text())["steps"]]
    assert steps == [("environment", "skipped", None), ("extension-build", "skipped", None), ("capacity", "timeout", 1)]


def fake_sanitizer(tmp_path: Path, behaviour: str) -> str:
    path = tmp_path / "compute-sanitizer"
    path.write_text(f"#!/bin/bash\n{behaviour}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow
def test_a_failed_step_sets_the_exit_status_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "returned"
    sanitizer = fake_sanitizer(tmp_path, "echo '========= ERROR SUMMARY: 3 errors'; exit 1")
    proc = run_suite(out, "--steps", "sanitizer-memcheck bench-channel", FASTNL_SUITE_SANITIZER=sanitizer)
    assert proc.returncode == 1, proc.stderr
    steps = {s["name"]: s for s in strict_json((out / "results.json").read_text())["steps"]}
    assert steps["sanitizer-memcheck"]["status"] == "failed"
    assert steps["sanitizer-memcheck"]["reason"] == "exit 1: ========= ERROR SUMMARY: 3 errors"
    assert steps["bench-channel"]["status"] == "ok" and len(steps["bench-channel"]["rows"]) == 16
    assert "| sanitizer-memcheck | failed |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    (("{missing}/out",), "does not exist"),
    (("{tmp}/out", "--part", "3"), "--part must be 1, 2 or all"),
    (("{tmp}/out", "--steps", "nosuch"), "unknown step 'nosuch'"),
    (("{full}",), "holds other files"),
])
def test_bad_arguments_give_one_line(tmp_path, args, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "other.txt").write_text("x")
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path, full=full) for a in args]
    proc = subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable, FASTNL_SUITE_DEVICE="cpu"))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tuned_configs_pick_the_fastest_row_per_kernel_and_shape():
    record = _record_module()
    base = {"kind": "config", "BLOCK_N": 64, "BLOCK_DV": 64, "stages": 2, "warps": 4}
    rows = [{**base, "kernel": "fwd", "L": 1024, "D": 512, "BLOCK_M": 64, "ms": 2.0},
            {**base, "kernel": "fwd", "L": 1024, "D": 512, "BLOCK_M": 128, "ms": 1.5},
            {**base, "kernel": "fwd", "L": 256, "D": 1024, "BLOCK_M": 32, "ms": 0.7},
            {**base, "kernel": "dq", "L": 1024, "D": 512, "BLOCK_M": 64, "refused": "out of shared memory"},
            {**base, "kernel": "dq", "L": 1024, "D": 512, "BLOCK_M": 32, "ms": 3.0}]
    env = {"device_name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "triton": "3.6.0", "torch": "2.11.0"}
    tuned = record.tuned_configs({"environment": env, "suites": {"configs": rows}})
    assert (tuned["gpu"], tuned["capability"]) == ("NVIDIA H100 80GB HBM3", [9, 0])
    picked = {(c["kernel"], c["L"], c["D"]): (c["BLOCK_M"], c["ms"]) for c in tuned["configs"]}
    assert picked == {("fwd", 1024, 512): (128, 1.5), ("fwd", 256, 1024): (32, 0.7), ("dq", 1024, 512): (32, 3.0)}
    assert record.tuned_configs({"environment": env, "suites": {"configs": rows[3:4]}}) is None
    # cut by its cap in the middle of dq at L=1024: dq is left out, not picked from half its candidates
    cut = record.tuned_configs({"environment": env, "suites": {"configs": rows}, "running": "configs"})
    assert {(c["kernel"], c["L"]) for c in cut["configs"]} == {("fwd", 1024), ("fwd", 256)}


def test_a_running_step_shows_its_rows_so_far(tmp_path):
    record = _record_module()
    data = tmp_path / "bench.json"
    record.main(["init", str(tmp_path), "gpu=test", "part=1"])
    record.main(["start", str(tmp_path), "bench-attention", "100"])
    data.write_text(json.dumps({"environment": {}, "running": "attention",
                                "suites": {"attention": [{"kind": "attention", "fwd_s": 0.1}] * 2}}))
    record.main(["progress", str(tmp_path), "bench-attention", "--data", str(data)])
    (step,) = strict_json((tmp_path / "results.json").read_text())["steps"]
    assert step["status"] == "running" and len(step["rows"]) == 2
    data.write_text('{"half a fi')  # caught mid-write: left as it was
    record.main(["progress", str(tmp_path), "bench-attention", "--data", str(data)])
    assert len(strict_json((tmp_path / "results.json").read_text())["steps"][0]["rows"]) == 2
    assert "| bench-attention | running | - | 100 | 2 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_full_dry_run_every_step_ok_within_budget(tmp_path):
    """Every step of the suite, scaled down on the CPU (about 4 minutes on 2 busy cores)."""
    out = tmp_path / "returned"
    proc = run_suite(out, "--part", "all", "--budget", "540")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_output_rules(out)
    results = strict_json((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in results["steps"]}
    assert len(status) == 12
    assert status.pop("sanitizer-memcheck") == "skipped"  # no GPU
    assert set(status.values()) == {"ok"}, status
    assert results["suite"]["finished_s"] <= 540
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert any(n.endswith(".png") for n in tar.getnames())
