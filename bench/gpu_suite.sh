#!/usr/bin/env bash
# The GPU check-and-benchmark suite of fastnl, for a bare GPU machine lent for a few minutes.
#
#   bash bench/gpu_suite.sh OUTDIR [--part 1|2|all] [--steps "STEP ..."] [--budget SECONDS]
#
# Runs as-is from a copy of the repository (no .git needed, no pip, no network, the package not
# installed: PYTHONPATH is the copy; the C++/CUDA extension is JIT-built by fastnl/_extension.py
# when this machine lacks it). Every part is self-contained: a fresh machine is fine.
#
#   part 1 (default): environment, extension-build, check, pytest-gpu, sanitizer-memcheck,
#                     bench-attention, bench-channel, bench-nlam-model
#   part 2:           environment, extension-build, pytest-rest, bench-configs, loader, capacity
#   all:              every step, in the order above (correctness, speed tables, capacity)
#
# OUTDIR receives at most four files, rewritten after every step and every 15 s of a step that
# writes rows (so whatever stops the suite, what was measured is there): summary.md, results.json (every step with its status, reason and
# rows), tuned-configs.json (the fastest Triton configuration per kernel and shape, from
# bench-configs) and logs.tar.gz (logs/, data/ the raw JSON of each step, files/ the PNGs,
# snapshots/ results.json after each step). bench/unpack_results.sh turns it into the committed
# bench/results/<date>-<gpu>/.
#
# Steps run in the order above (correctness, speed tables, capacity), however --steps names
# them. Each step has its own time cap and the whole run a budget (default 540 s); a step that
# fails or runs out of time is recorded with its reason and the suite goes on; steps that no
# longer fit the budget are recorded as skipped. Timings run one process at a time (pytest-xdist only
# in the pytest steps). Autotuning is off (FASTNL_AUTOTUNE=0) except in bench-configs.
#
# Environment: PYTHON (default python3); FASTNL_SUITE_BUDGET (seconds, as --budget);
# FASTNL_SUITE_DEVICE=cpu (a scaled-down dry run of every step on the CPU with doubled caps, for
# checking the script; not GPU figures); FASTNL_SUITE_CAPS="STEP=SECONDS ..." (these caps, the
# budget ignored); FASTNL_SUITE_SANITIZER (the compute-sanitizer to run, also in a dry run);
# FASTNL_SUITE_COMMIT (the commit to report; else a COMMIT file in the repository root, else
# git). Exit status: 0 when every step ran, timed out or was skipped, 1 when a step failed, 2
# for bad arguments or no GPU.
set -u -o pipefail

# The whole script is one function: bash reads it completely before running any step.
main() {

die() { echo "gpu_suite: $*" >&2; exit 2; }
usage="usage: bash bench/gpu_suite.sh OUTDIR [--part 1|2|all] [--steps \"STEP ...\"] [--budget SECONDS]"

PART1="environment extension-build check pytest-gpu sanitizer-memcheck bench-attention bench-channel bench-nlam-model"
PART2="environment extension-build pytest-rest bench-configs loader capacity"
ALL_STEPS="environment extension-build check pytest-gpu sanitizer-memcheck bench-attention bench-channel bench-nlam-model pytest-rest bench-configs loader capacity"
# The cap of each step (seconds) on a GPU; a step gets less when the budget has less left.
declare -A CAP=([environment]=30 [extension-build]=240 [check]=120 [pytest-gpu]=150
    [sanitizer-memcheck]=60 [bench-attention]=100 [bench-channel]=60 [bench-nlam-model]=150
    [bench-configs]=150 [pytest-rest]=180 [loader]=45 [capacity]=240)
# Seconds the steps before these keep for them (the tables part 1 exists for, and capacity).
declare -A KEEP=([bench-attention]=60 [bench-channel]=20 [bench-nlam-model]=90 [capacity]=120)
MARGIN=15  # seconds kept at the end of the budget for the last bookkeeping
OUTPUTS="summary.md results.json tuned-configs.json logs.tar.gz"

# --- arguments ---------------------------------------------------------------------------------
local outdir="" part=1 steps="" budget=${FASTNL_SUITE_BUDGET:-540}
while (( $# )); do
    case $1 in
        -h|--help) echo "$usage"; exit 0 ;;
        --part|--steps|--budget)
            (( $# >= 2 )) || die "$1 needs a value ($usage)"
            case $1 in --part) part=$2 ;; --steps) steps=$2 ;; --budget) budget=$2 ;; esac
            shift 2 ;;
        -*) die "unknown option $1 ($usage)" ;;
        *) [ -z "$outdir" ] || die "one OUTDIR only, got '$outdir' and '$1'"; outdir=$1; shift ;;
    esac
done
[ -n "$outdir" ] || die "$usage"
[[ $budget =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$budget'"
if [ -z "$steps" ]; then
    case $part in
        1) steps=$PART1 ;; 2) steps=$PART2 ;; all) steps=$ALL_STEPS ;;
        *) die "--part must be 1, 2 or all, got '$part'" ;;
    esac
else
    part=custom
    local s
    for s in $steps; do [[ " $ALL_STEPS " == *" $s "* ]] || die "unknown step '$s': choose from $ALL_STEPS"; done
    # a fresh machine needs the environment record and the extension before anything else
    steps="environment extension-build $steps"
fi
declare -A FORCED=()
local item
for item in ${FASTNL_SUITE_CAPS:-}; do
    [[ $item =~ ^([a-z-]+)=([0-9]+)$ ]] || die "FASTNL_SUITE_CAPS: expected STEP=SECONDS, got '$item'"
    FORCED[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done

[[ $outdir == /* ]] || outdir="$PWD/$outdir"  # the suite runs from the repository root
local parent
parent=$(dirname -- "$outdir")
[ -d "$parent" ] || die "cannot create $outdir: folder $parent does not exist"

cd "$(dirname -- "${BASH_SOURCE[0]}")/.." || die "cannot enter the repository root"
ROOT=$PWD
PY=${PYTHON:-python3}
RECORD="$ROOT/bench/suite_record.py"
DEVICE=${FASTNL_SUITE_DEVICE:-cuda}
[ "$DEVICE" = cuda ] || [ "$DEVICE" = cpu ] || die "FASTNL_SUITE_DEVICE must be cuda or cpu, got '$DEVICE'"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc 2> /dev/null || echo 4)}
export PYTHONUNBUFFERED=1
export FASTNL_AUTOTUNE=0  # default configurations; only bench-configs tunes
if [ "$DEVICE" = cpu ]; then
    export TRITON_INTERPRET=1
    local k
    for k in "${!CAP[@]}"; do CAP[$k]=$(( 2 * CAP[$k] )); done  # a shared CPU is slower than the GPU machine
fi
command -v "$PY" > /dev/null || die "no $PY here (set PYTHON)"
command -v timeout > /dev/null || die "the suite needs timeout (coreutils)"

if [ "$DEVICE" = cuda ]; then
    GPU_NAME=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" 2> /dev/null) \
        || die "no CUDA device visible to $PY (FASTNL_SUITE_DEVICE=cpu runs a dry run)"
else
    GPU_NAME="cpu dry run"
fi

# OUTDIR: its parent must exist; it may exist only empty or holding a previous run's outputs.
if [ -e "$outdir" ]; then
    [ -d "$outdir" ] || die "$outdir exists and is not a folder"
    local f
    for f in "$outdir"/* "$outdir"/.[!.]*; do
        [ -e "$f" ] || continue
        [[ " $OUTPUTS " == *" $(basename -- "$f") "* ]] || [[ $(basename -- "$f") == .*.tmp ]] \
            || die "$outdir holds other files ($(basename -- "$f")): give an empty or new folder"
    done
else
    mkdir -- "$outdir" 2> /dev/null || die "cannot create $outdir (is $parent writable?)"
fi
[ -w "$outdir" ] && touch "$outdir/.probe.tmp" 2> /dev/null || die "cannot write into $outdir"
rm -f "$outdir/.probe.tmp"
OUT=$(cd -- "$outdir" && pwd)
rm -f "$OUT"/summary.md "$OUT"/results.json "$OUT"/tuned-configs.json "$OUT"/logs.tar.gz

SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')

local commit
if [ -n "${FASTNL_SUITE_COMMIT:-}" ]; then
    commit="commit $FASTNL_SUITE_COMMIT"
elif [ -s "$ROOT/COMMIT" ]; then
    commit="commit $(head -n 1 "$ROOT/COMMIT")"
elif [ -e "$ROOT/.git" ] && git -C "$ROOT" rev-parse --git-dir > /dev/null 2>&1; then  # not a parent's
    commit="commit $(git -C "$ROOT" rev-parse --short HEAD)"
    git -C "$ROOT" diff --quiet HEAD 2> /dev/null || commit+=" (with uncommitted changes)"
else
    commit="commit unknown (no .git)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastnl-suite.XXXXXX") || die "cannot make a scratch folder"
trap 'rm -rf "$WORK"' EXIT
STEP_PID=""  # the running step (its timeout process), stopped with the suite
trap '[ -n "$STEP_PID" ] && kill -TERM "$STEP_PID" 2> /dev/null; echo "gpu_suite: stopped" >&2; exit 130' INT TERM
PACK="$WORK/pack"  # what goes into logs.tar.gz
mkdir -p "$PACK/logs" "$PACK/data" "$PACK/files" "$PACK/snapshots" "$WORK/scripts"
START=$SECONDS
FAILED=0
NSTEP=0

record() { "$PY" "$RECORD" "$@" >> "$PACK/logs/suite.log" 2>&1 || echo "gpu_suite: bookkeeping failed: $*" >&2; }
pack() {
    tar -czf "$OUT/.logs.tar.gz.tmp" -C "$PACK" . 2>> "$PACK/logs/suite.log" \
        && mv -f "$OUT/.logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}
note() { record note "$OUT" -- "$*"; echo "note: $*"; }
selected() { [[ " $steps " == *" $1 "* ]]; }
has() { "$PY" -c "import $1" > /dev/null 2>&1; }

record init "$OUT" gpu="$GPU_NAME" slug="$SLUG" device="$DEVICE" part="$part" steps="$steps" \
    budget_s="$budget" commit="$commit" host="$(hostname)" date="$(date -u +%Y-%m-%d)" \
    started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
[ -s "$OUT/results.json" ] || die "cannot write $OUT/results.json (see the message above)"
echo "fastnl GPU suite on $GPU_NAME, part $part, budget ${budget}s, $commit -> $OUT"

# cap_for NAME: the step's cap, or less so that it fits the budget and leaves the later steps
# their KEEP seconds
cap_for() {
    local name=$1 cap=${CAP[$1]} left later="" s
    left=$(( budget - (SECONDS - START) - MARGIN ))
    for s in $ALL_STEPS; do
        [ -n "$later" ] && selected "$s" && left=$(( left - ${KEEP[$s]:-0} ))
        [ "$s" = "$name" ] && later=yes
    done
    (( left < cap )) && cap=$left
    (( cap < 0 )) && cap=0
    echo "$cap"
}

# run_step NAME DATA COMMAND...: run under the step's cap, log to logs/NAME.log, record the
# outcome and the rows of DATA (the file the command writes, or "" for none), then re-pack.
run_step() {
    local name=$1 data=$2
    shift 2
    selected "$name" || return 0
    local cap log="$PACK/logs/$name.log" t0=$SECONDS rc status reason=""
    NSTEP=$(( NSTEP + 1 ))
    if [ -n "${FORCED[$name]:-}" ]; then
        cap=${FORCED[$name]}
    else
        cap=$(cap_for "$name")
        if (( cap < 5 )); then
            record finish "$OUT" "$name" skipped 0 --reason="no time left in the ${budget}s budget"
            echo "== $name: skipped, no time left in the budget"
            snapshot "$name"
            return 0
        fi
    fi
    echo "== $name (cap ${cap}s)"
    record start "$OUT" "$name" "$cap"
    timeout --kill-after=5 "$cap" "$@" > "$log" 2>&1 &
    local pid=$! tick=0
    STEP_PID=$pid
    while kill -0 "$pid" 2> /dev/null; do  # every 15 s, the rows so far into results.json
        sleep 1
        tick=$(( tick + 1 ))
        if (( tick % 15 == 0 )) && [ -n "$data" ] && [ -s "$data" ]; then
            record progress "$OUT" "$name" --data "$data" && pack
        fi
    done
    wait "$pid"
    rc=$?
    STEP_PID=""
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; reason="timed out after its ${cap}s cap" ;;
        *) status=failed; reason="exit $rc" ;;
    esac
    if [ "$name" = sanitizer-memcheck ] && [ "$rc" != 0 ] && grep -qi "device not supported" "$log"; then
        status=skipped; reason="compute-sanitizer: $(grep -i -m 1 "device not supported" "$log" | sed 's/^[= ]*//')"
    fi
    local last
    last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c 1-200)
    [ "$status" = failed ] && FAILED=1 && reason="$reason: $last"
    [ "$status" = timeout ] && [ -n "$last" ] && reason="$reason; its last output: $last"
    record finish "$OUT" "$name" "$status" $(( SECONDS - t0 )) --reason="$reason" \
        ${data:+--data "$data"} --log "$log" --log-name "logs/$name.log"
    tail -n 3 "$log" | sed 's/^/   /'
    echo "   -> $status${reason:+ ($reason)}"
    snapshot "$name"
}

# skip_step NAME REASON: record a step that cannot run here.
skip_step() {
    selected "$1" || return 0
    NSTEP=$(( NSTEP + 1 ))
    record finish "$OUT" "$1" skipped 0 --reason="$2"
    echo "== $1: skipped ($2)"
    snapshot "$1"
}

snapshot() {
    cp "$OUT/results.json" "$PACK/snapshots/$(printf '%02d' "$NSTEP")-$1.json" 2> /dev/null
    pack
}

D="$PACK/data"
QUICK=""
[ "$DEVICE" = cuda ] || QUICK="--quick"

# --- environment ---------------------------------------------------------------------------------
cat > "$WORK/scripts/environment.py" <<'EOF'
import json, os, platform, sys
info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
for name in ("torch", "triton", "timm", "numpy", "pytest", "xdist", "pytest_benchmark", "matplotlib",
             "nvidia.dali"):
    try:
        module = __import__(name, fromlist=["__version__"])
        info[name] = getattr(module, "__version__", "present")
    except Exception:
        info[name] = None
import torch


# what one tiny kernel costs (fastnl bench step-cost --launch-us prices every kernel at least
# this): on the GPU, back to back with the host ahead (queued behind a sleep kernel) and in a
# CUDA graph's replay; on the host, per aten op (the host keeps ahead when this is smaller)
def launch_costs():
    import time
    x, n = torch.zeros(256, device="cuda"), 1000
    for _ in range(100):
        x.add_(1.0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s: the host queues the n kernels meanwhile
    start.record()
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    host_us = 1e6 * (time.perf_counter() - t) / n
    end.record()
    torch.cuda.synchronize()
    launch = {"stream_us": round(1e3 * start.elapsed_time(end) / n, 3), "host_us": round(host_us, 3)}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(100):
            x.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    launch["graph_us"] = round(1e3 * start.elapsed_time(end) / 1000, 3)
    return launch


info["cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "memory_mb": p.total_memory // 2**20, "capability": [p.major, p.minor],
                   "multiprocessors": p.multi_processor_count}
    try:
        info["launch"] = launch_costs()
    except Exception as err:  # the environment is recorded all the same
        info["launch"] = {"error": f"{type(err).__name__}: {err}"}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
run_step environment "$D/environment.json" "$PY" "$WORK/scripts/environment.py" "$D/environment.json"
if command -v nvidia-smi > /dev/null; then timeout 20 nvidia-smi > "$PACK/logs/nvidia-smi.txt" 2>&1; fi
has nvidia.dali || ! selected loader \
    || note "DALI is not installed here: the loader figures are the torch DataLoader's only (no device=\"mixed\" decoding)."
has matplotlib || ! selected capacity || note "matplotlib is not installed here: no PNG plot of the capacity search."

# --- the extension (JIT-built from csrc/ for this torch where it is missing) -----------------------
run_step extension-build "" "$PY" -c "
import time, torch
t = time.time()
from fastnl import _extension
_extension.load()
print(f'extension loaded in {time.time() - t:.1f} s (CUDA kernels: {torch.cuda.is_available()})')
"
if selected extension-build && ! grep -q "extension loaded" "$PACK/logs/extension-build.log"; then
    export FASTNL_NO_JIT=1  # later steps would each retry the build
    note "the extension did not build or load (logs/extension-build.log): later steps ran without it (FASTNL_NO_JIT=1)."
fi

# --- correctness of the compiled kernels -----------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
    run_step check "$D/check.json" "$PY" -m fastnl check --device cuda --json "$D/check.json"
else
    run_step check "$D/check.json" "$PY" -m fastnl check --device cpu --size tiny --dtype float32 --json "$D/check.json"
fi

XDIST=""
[ "$DEVICE" = cuda ] && has xdist && XDIST="-n 4"  # nothing is timed while a pytest step runs
if ! has pytest; then
    skip_step pytest-gpu "pytest is not installed here"
    skip_step pytest-rest "pytest is not installed here"
elif [ "$DEVICE" = cuda ]; then
    run_step pytest-gpu "$D/pytest-gpu.xml" "$PY" -m pytest -m "gpu or triton" $XDIST -q -p no:cacheprovider \
        --junitxml="$D/pytest-gpu.xml" tests
else  # the dry run: the gpu tests of one file (all skipped without a GPU)
    run_step pytest-gpu "$D/pytest-gpu.xml" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        --junitxml="$D/pytest-gpu.xml" tests/test_channel_attention.py
fi

cat > "$WORK/scripts/memcheck.py" <<'EOF'
"""The extension's CUDA kernels, forward and backward, on small NLAM and SE-tail shapes (run under memcheck)."""
import torch
from fastnl import ops

gen = torch.Generator().manual_seed(0)
for B, N, C, H, W in [(2, 4, 256, 16, 8), (2, 4, 512, 8, 4), (1, 3, 48, 5, 7)]:
    for dtype in (torch.float32, torch.bfloat16):
        R = max(1, C // 16)
        make = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype).requires_grad_()
        for layout in ("contiguous", "channels-strided"):
            x = make(B, N, C, H, W) if layout == "contiguous" else make(B, N, H, W, C).permute(0, 1, 4, 2, 3)
            w1, b1, w2, b2 = make(R, C), make(R), make(C, R), make(C)
            out = ops.channel_attention(x, w1, b1, w2, b2, backend="extension")
            ref = ops.channel_attention(x, w1, b1, w2, b2, backend="reference")
            grads = torch.autograd.grad(out.float().square().sum(), (x, w1, b1, w2, b2))
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            print(f"{(B, N, C, H, W)} {dtype} {layout}: max |extension - reference| {err:.3g}")
            assert all(torch.isfinite(g).all() for g in grads)
# the SE bottleneck tail: contiguous (a warp per plane, 16-byte packs where H*W allows) and
# channels_last (a thread per channel), planes of 1 to 128 positions
for N, C, H, W in [(4, 256, 16, 8), (4, 2048, 2, 1), (3, 24, 5, 7)]:
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x, r = (torch.randn(N, C, H, W, generator=gen).to("cuda", dtype).contiguous(memory_format=fmt)
                    .requires_grad_() for _ in range(2))
            gate = torch.rand(N, C, generator=gen).to("cuda", dtype).requires_grad_()
            out = ops.se_residual_relu(x, gate, r, backend="extension")
            ref = ops.se_residual_relu(x, gate, r, backend="reference")
            grads = torch.autograd.grad(out.float().square().sum(), (x, gate, r))
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            print(f"se tail {(N, C, H, W)} {dtype} {layout}: max |extension - reference| {err:.3g}")
            assert all(torch.isfinite(g).all() for g in grads)
# the Triton BatchNorm kernels (BatchNorm + ReLU, the bottleneck end) at an odd shape whose last
# channel block and position block are partial, bf16, both layouts (the pytest step compiled them)
from timm.layers import SEModule
for layout in ("contiguous", "channels_last"):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y, r = (torch.randn(3, 130, 23, 29, generator=gen).to("cuda", torch.bfloat16).contiguous(memory_format=fmt)
            .requires_grad_() for _ in range(2))
    w, b = (torch.rand(130, generator=gen).to("cuda").requires_grad_() for _ in range(2))
    se = SEModule(130, rd_ratio=1 / 16).to("cuda", torch.bfloat16)
    excite = lambda s: se.gate(se.fc2(se.act(se.bn(se.fc1(s)))))
    for op, call in (("batch_norm_relu", lambda be: ops.batch_norm_relu(y, None, None, w, b, training=True, backend=be)),
                     ("bn_se_residual_relu", lambda be: ops.bn_se_residual_relu(y, None, None, w, b, excite, r,
                                                                                training=True, backend=be)),
                     ("bn_se_residual_relu[shortcut_norm]", lambda be: ops.bn_se_residual_relu(
                         y, None, None, w, b, excite, r, training=True, backend=be,
                         shortcut_norm=ops.ShortcutNorm(None, None, b, w)))):
        out, ref = call("triton"), call("reference")
        grads = torch.autograd.grad(out.float().square().sum(), (y, w, b))
        torch.cuda.synchronize()
        err = (out.float() - ref.float()).abs().max().item()
        print(f"{op} (3, 130, 23, 29) bf16 {layout}: max |triton - reference| {err:.3g}")
        assert all(torch.isfinite(g).all() for g in grads)
# the SE excitation's kernels (17 images: a partial block of 16; 130 channels, R = 8 < 16)
from fastnl import _se_excite
se = SEModule(130, rd_ratio=1 / 16).to("cuda", torch.bfloat16)
s = torch.randn(17, 130, 1, 1, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
gate, ref = _se_excite.excite(se, s), se.gate(se.fc2(se.act(se.fc1(s))))
grads = torch.autograd.grad(gate.float().square().sum(), (s, *se.parameters()))
torch.cuda.synchronize()
print(f"se_excitation (17, 130) R=8 bf16: max |triton - reference| {(gate.float() - ref.float()).abs().max().item():.3g}")
assert all(torch.isfinite(g).all() for g in grads)
print("memcheck workload done")
EOF
SANITIZER=${FASTNL_SUITE_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null | head -n 1)}
if [ "$DEVICE" != cuda ] && [ -z "${FASTNL_SUITE_SANITIZER:-}" ]; then
    skip_step sanitizer-memcheck "no GPU (dry run)"
elif [ -z "$SANITIZER" ]; then
    skip_step sanitizer-memcheck "compute-sanitizer is not installed here"
else
    run_step sanitizer-memcheck "" "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
        "$PY" "$WORK/scripts/memcheck.py"
fi

# --- speed tables (one process on the GPU at a time) ------------------------------------------------
# (on a GPU also the engine table measured there, data/engine-table.json: FASTNL_ENGINE_TABLE=FILE
# makes backend="auto" use it instead of the committed cost-model table)
run_step bench-attention "$D/bench-attention.json" "$PY" -m fastnl bench attention --device "$DEVICE" $QUICK \
    --json "$D/bench-attention.json" --engine-table "$D/engine-table.json"
run_step bench-channel "$D/bench-channel.json" "$PY" -m fastnl bench channel --device "$DEVICE" $QUICK \
    --json "$D/bench-channel.json"
# the training step (model) before the NLAM block alone: if the cap cuts, it cuts the lesser table
run_step bench-nlam-model "$D/bench-nlam-model.json" "$PY" -m fastnl bench model nlam --device "$DEVICE" $QUICK \
    --json "$D/bench-nlam-model.json"

# --- the rest of the tests with CUDA present --------------------------------------------------------
if has pytest && [ "$DEVICE" = cuda ]; then
    run_step pytest-rest "$D/pytest-rest.xml" "$PY" -m pytest -m "not slow and not gpu and not triton" $XDIST \
        -q -p no:cacheprovider --ignore=tests/test_gpu_suite.py --junitxml="$D/pytest-rest.xml" tests
elif has pytest; then  # the dry run: one small file
    run_step pytest-rest "$D/pytest-rest.xml" "$PY" -m pytest -m "not slow and not gpu and not triton" \
        -q -p no:cacheprovider --junitxml="$D/pytest-rest.xml" tests/test_metrics.py
fi

# Every Triton configuration the autotuner may pick, timed at the model's shapes; the fastest per
# kernel and shape go to tuned-configs.json. (The dry run sweeps a tiny shape under the interpreter.)
run_step bench-configs "$D/bench-configs.json" env FASTNL_AUTOTUNE=1 "$PY" -m fastnl bench configs \
    --device "$DEVICE" $QUICK --json "$D/bench-configs.json"
if selected bench-configs && [ -s "$D/bench-configs.json" ]; then record tune "$OUT" "$D/bench-configs.json"; pack; fi

# --- clip loader throughput ------------------------------------------------------------------------
# (fastnl bench loader: the torch DataLoader, and DALI where it is installed)
run_step loader "$D/loader.json" "$PY" -m fastnl bench loader --device "$DEVICE" $QUICK --json "$D/loader.json"

# --- capacity: the largest batch and the longest clips that train ------------------------------------
if selected capacity; then
    local cap_secs=${FORCED[capacity]:-$(cap_for capacity)}
    local search=$(( cap_secs > 50 ? cap_secs - 30 : 10 ))  # the search stops itself; the rest is start-up
    if [ "$DEVICE" = cuda ]; then
        run_step capacity "$D/capacity.json" "$PY" -m fastnl bench capacity --device cuda --out "$PACK/files" \
            --json "$D/capacity.json" --time-limit "$search"
    else
        run_step capacity "$D/capacity.json" "$PY" -m fastnl bench capacity --device cpu --quick --max-frames 32 \
            --max-batch 32 --budget-mb 256 --out "$PACK/files" --json "$D/capacity.json" --time-limit "$search"
    fi
fi

record done "$OUT" $(( SECONDS - START ))
pack
echo "finished in $(( SECONDS - START ))s (budget ${budget}s); results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
return $FAILED
}

# one compound command: parsed whole before it runs, so an edit of this file meanwhile is harmless
{ main "$@"; exit $?; }
