#!/usr/bin/env bash
# The GPU check-and-benchmark suite of fastnl, in one run of at most 10 minutes of wall time.
#
# Runs as-is from the repository root on a bare GPU machine: python3 with torch, triton and
# timm, no pip, no network, the package not installed (PYTHONPATH=$PWD; the C++/CUDA extension
# is compiled by the JIT path of fastnl/_extension.py). Steps, each with its own time limit:
#   environment -> extension build -> fastnl check -> pytest -m "gpu or triton" -> compute-sanitizer
#   memcheck of the extension's GPU tests -> fastnl bench (attention, channel, nlam + model)
#   -> clip loader throughput (torch DataLoader; DALI "mixed" decoding where importable)
#   -> fastnl bench configs (every Triton configuration timed)
#   -> fastnl bench capacity (gets whatever time is left, at least RESERVE seconds)
# Everything (JSON, PNG, logs, summary.md) goes to bench/results/<date>-<gpu>/.
#
#   bash bench/gpu_suite.sh
#
# Environment: PYTHON (default python3), FASTNL_SUITE_OUT (results folder),
# FASTNL_SUITE_BUDGET (wall seconds, default 570), FASTNL_SUITE_DEVICE=cpu (a scaled-down dry
# run of every step on the CPU, for checking the script itself; its results are not GPU figures),
# FASTNL_SUITE_ONLY="step ..." (run only these steps, e.g. in two runs of 10 minutes each into
# the same FASTNL_SUITE_OUT: "extension-build check pytest-gpu sanitizer-memcheck bench-attention
# bench-channel" then "bench-nlam-model loader bench-configs capacity"; a run into an existing
# folder appends to its summary).
set -u -o pipefail

# The whole script is one function: bash reads it completely before running any step.
main() {

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEVICE=${FASTNL_SUITE_DEVICE:-cuda}
BUDGET=${FASTNL_SUITE_BUDGET:-570}
RESERVE=150  # seconds kept for the capacity search
ONLY=${FASTNL_SUITE_ONLY:-}
if [ -n "$ONLY" ] && [[ " $ONLY " != *" capacity "* ]]; then RESERVE=0; fi
START=$SECONDS
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
    if ! GPU_NAME=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" 2>/dev/null); then
        echo "gpu_suite: no CUDA device visible to $PY (set FASTNL_SUITE_DEVICE=cpu for a dry run)" >&2
        exit 2
    fi
else
    GPU_NAME="cpu dry run"
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
OUT=${FASTNL_SUITE_OUT:-bench/results/$(date +%Y-%m-%d)-$SLUG}
mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary.md"
FAILED=0

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

# limit CAP [RESERVED]: CAP seconds, or less so that RESERVED seconds stay for later steps.
limit() {
    local cap=$1 reserved=${2:-$RESERVE} left
    left=$(( $(remaining) - reserved ))
    (( left < cap )) && cap=$left
    (( cap < 0 )) && cap=0
    echo "$cap"
}

# selected NAME: whether FASTNL_SUITE_ONLY (when set) names the step; environment always runs.
selected() { [ -z "$ONLY" ] || [ "$1" = environment ] || [[ " $ONLY " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: run with a time limit, log to logs/NAME.log, record the outcome.
step() {
    local name=$1 secs=$2
    shift 2
    local log="$OUT/logs/$name.log" t0=$SECONDS rc status
    selected "$name" || return 0
    if (( secs < 10 )); then
        echo "| $name | SKIP (no time left) | 0 | |" >> "$SUMMARY"
        echo "== $name: skipped, no time left"
        return 0
    fi
    echo "== $name (limit ${secs}s)"
    timeout --kill-after=10 "$secs" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${secs}s"; FAILED=1 ;;
        *) status="FAIL (exit $rc)"; FAILED=1 ;;
    esac
    echo "| $name | $status | $(( SECONDS - t0 )) | logs/$name.log |" >> "$SUMMARY"
    tail -n 5 "$log" | sed 's/^/   /'
    return 0
}

note() { grep -qxF -- "- $*" "$OUT/notes.md" 2>/dev/null || echo "- $*" >> "$OUT/notes.md"; echo "note: $*"; }

STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), device \`$DEVICE\`, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo " (with uncommitted changes)")${ONLY:+, steps: $ONLY}"
if [ -n "$ONLY" ] && [ -s "$SUMMARY" ]; then
    printf '\n## Continued\n\nStarted %s.\n\n| step | result | seconds | log |\n|---|---|---|---|\n' "$STARTED" >> "$SUMMARY"
else
    printf '# fastnl GPU suite: %s\n\nStarted %s.\n\n| step | result | seconds | log |\n|---|---|---|---|\n' \
        "$GPU_NAME" "$STARTED" > "$SUMMARY"
    : > "$OUT/notes.md"
fi

# --- environment --------------------------------------------------------------------------
step environment 30 "$PY" - "$OUT/environment.json" <<'EOF'
import json, platform, sys
info = {"python": platform.python_version(), "platform": platform.platform()}
for name in ("torch", "triton", "timm", "numpy", "pytest", "pytest_benchmark", "matplotlib", "nvidia.dali"):
    try:
        module = __import__(name, fromlist=["__version__"])
        info[name] = getattr(module, "__version__", "present")
    except Exception as err:
        info[name] = None
import torch
info["cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "memory_mb": p.total_memory // 2**20, "sm": f"{p.major}.{p.minor}",
                   "multiprocessors": p.multi_processor_count}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1; fi

has() { "$PY" -c "import $1" > /dev/null 2>&1; }
has nvidia.dali || note "DALI is not installed here: the loader figures are the torch DataLoader's only (no device=\"mixed\" decoding measured)."
has pytest || note "pytest is not installed here: the tests marked gpu were not run."
has matplotlib || note "matplotlib is not installed here: no PNG plot of the capacity search."

# --- the extension (JIT build of csrc/ for this torch) -------------------------------------
step extension-build "$(limit 240)" "$PY" -c "
import time, torch
t = time.time()
from fastnl import _extension
_extension.load()
print(f'extension loaded in {time.time() - t:.1f} s (CUDA kernels: {torch.cuda.is_available()})')
"

# --- correctness -----------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
    step check "$(limit 120)" "$PY" -m fastnl check --device cuda --json "$OUT/check.json"
else
    step check "$(limit 300)" "$PY" -m fastnl check --device cpu --size tiny --dtype float32 --json "$OUT/check.json"
fi

if has pytest; then
    XDIST=""
    has xdist && XDIST="-n 4"  # Triton compiles one kernel per process at a time
    step pytest-gpu "$(limit 200)" "$PY" -m pytest -m "gpu or triton" $XDIST -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" tests
    SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if ! selected sanitizer-memcheck; then
        :
    elif [ "$DEVICE" != cuda ]; then
        note "compute-sanitizer memcheck: not run (no GPU)."
    elif [ -n "$SANITIZER" ]; then
        step sanitizer-memcheck "$(limit 90)" "$SANITIZER" --tool memcheck --error-exitcode 1 \
            "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_channel_attention.py -k "contiguous or real_shape"
    else
        note "compute-sanitizer is not installed here: the extension's memcheck was not run."
    fi
fi

# --- benchmarks ------------------------------------------------------------------------------
QUICK=""
[ "$DEVICE" = cuda ] || QUICK="--quick"
for suite in attention channel; do
    step "bench-$suite" "$(limit 90)" "$PY" -m fastnl bench $suite --device "$DEVICE" $QUICK --json "$OUT/bench-$suite.json"
done
step bench-nlam-model "$(limit 150)" "$PY" -m fastnl bench nlam model --device "$DEVICE" $QUICK --json "$OUT/bench-nlam-model.json"

step loader "$(limit 60)" "$PY" - "$OUT/loader.json" "$DEVICE" <<'EOF'
"""Clip loader throughput on a synthetic MARS-layout dataset at 256x128 (batch 8 x 4 x 8 frames)."""
import json, os, sys, tempfile, time, warnings
import torch
from fastnl.data.datasets import get_dataset
from fastnl.data.dali import dali_available
from fastnl.data.loader import build_train_loader
from fastnl.data.synthetic import write_dataset

out, device = sys.argv[1], sys.argv[2]
small = device != "cuda"
rows = []
with tempfile.TemporaryDirectory() as tmp:
    root = write_dataset(os.path.join(tmp, "mars"), ids=16 if small else 64, size=(256, 128),
                         min_frames=8, max_frames=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = get_dataset("synthetic", root)
    backends = ["torch"] + (["dali"] if dali_available() and device == "cuda" else [])
    for backend in backends:
        workers = 2 if small else min(8, os.cpu_count() or 1)
        loader = build_train_loader(dataset, frames=8, p=4 if small else 8, k=4, backend=backend, workers=workers)
        want = 4 if small else 20
        batches = clips = 0
        t0 = None
        for epoch in range(100):
            loader.set_epoch(epoch)
            for batch in loader:
                if t0 is None:
                    t0 = time.perf_counter()  # the first batch pays the start-up
                    continue
                if batch[0].is_cuda:
                    torch.cuda.synchronize()
                batches += 1
                clips += batch[0].shape[0]
                if batches >= want:
                    break
            if batches >= want:
                break
        seconds = time.perf_counter() - t0 if t0 else 0.0
        rows.append({"backend": backend, "decode": "mixed (GPU)" if backend == "dali" else "cpu (PIL)",
                     "workers": workers, "batches": batches, "clips_per_s": clips / seconds if seconds else None,
                     "frames_per_s": 8 * clips / seconds if seconds else None})
        print(rows[-1])
json.dump({"dali_available": dali_available(), "rows": rows}, open(out, "w"), indent=1)
EOF

# Every Triton configuration the autotuner may pick, timed at the model's shapes (for tuning the
# defaults and the search space); skipped on a CPU dry run.
step bench-configs "$(limit 90)" "$PY" -m fastnl bench configs --device "$DEVICE" $QUICK --json "$OUT/bench-configs.json"

# --- capacity: the rest of the time ----------------------------------------------------------
CAP_SECS=$(( $(remaining) - 15 ))
if [ "$DEVICE" = cuda ]; then
    step capacity "$CAP_SECS" "$PY" -m fastnl bench capacity --device cuda --out "$OUT" \
        --json "$OUT/capacity-summary.json" --time-limit $(( CAP_SECS > 40 ? CAP_SECS - 30 : 10 ))
else
    step capacity "$CAP_SECS" "$PY" -m fastnl bench capacity --device cpu --quick --max-frames 32 --max-batch 32 \
        --budget-mb 256 --out "$OUT" --json "$OUT/capacity-summary.json" --time-limit $(( CAP_SECS > 40 ? CAP_SECS - 30 : 10 ))
fi

{
    echo
    echo "Finished in $(( SECONDS - START )) s (budget $BUDGET s)."
    if [ -s "$OUT/notes.md" ]; then echo; echo "## Notes"; echo; cat "$OUT/notes.md"; fi
    if [ -f "$OUT/logs/capacity.log" ]; then
        echo; echo "## Capacity"; echo; echo '```'; grep -v '^  ' "$OUT/logs/capacity.log" | tail -n 20; echo '```'
    fi
    if [ -f "$OUT/logs/check.log" ]; then
        echo; echo "## Check"; echo; echo '```'; grep -E 'FAIL|SKIP|passed' "$OUT/logs/check.log" | tail -n 30; echo '```'
    fi
} >> "$SUMMARY"
echo "results in $OUT (summary.md)"
return $FAILED
}

main "$@"
exit $?
