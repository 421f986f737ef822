#!/usr/bin/env bash
# The CUDA checks, prepared for a session that gets an H200 (15 minutes of device time in all, one
# command of at most 10 minutes). Run from the repo root:
#
#     PYTHONPATH=src bash scripts/gpu_check.sh            # on the GPU machine, results under $OUT
#     DEVICE=cpu bash scripts/gpu_check.sh                # the same steps at tiny sizes, on a CPU
#     bash scripts/gpu_check.sh --dry-run                 # print the commands, run nothing
#
# Steps, each under `timeout -s INT` (an interrupted check or bench still writes what it finished),
# each continuing on failure:
#   0. wheels/*.whl (e.g. a carried fla-core wheel) installed with --no-deps into $OUT-independent
#      /tmp/attnlab-site, put first on PYTHONPATH;
#   a. attnlab check --device cuda --verbose          -> $OUT/check.txt
#   b. pytest on the CUDA tests (test_cuda.py: the Flex path; test_hf_cuda.py; the contract's cuda-* ids) -> $OUT/pytest.txt
#   c. attnlab bench --device cuda, full preset, 16K and 64K, causal, bf16     -> $OUT/bench/
#   then a summary ($OUT/summary.txt and stdout).
# $OUT gets at most 8 files (the device tool's limit): check.txt, pytest.txt, summary.txt, and
# bench/{bench.txt,results.json,results.csv,plots.tar}.
#
# Time budget (seconds, override with the variables): the three steps' timeouts sum to 540 so the
# whole script ends inside one 600 s command; the machine's 1-2 min start comes on top.
set -u

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
    CHECK_S=${CHECK_S:-150}
    PYTEST_S=${PYTEST_S:-110}
    BENCH_S=${BENCH_S:-280}
    CHECK_ARGS=(--device cuda --verbose)
    BENCH_ARGS=(--device cuda --preset full --lengths 16384 65536 --masks causal --dtype bf16 --modes fwd
        --mechanisms ${BENCH_MECHANISMS:-sliding_window document block_topk lightning}
        --gate cpu)  # step a is the device gate; the CPU one keeps the bench inside its 5 minutes
else  # the dry run on a CPU: the same steps, tiny
    CHECK_S=${CHECK_S:-120}
    PYTEST_S=${PYTEST_S:-120}
    BENCH_S=${BENCH_S:-180}
    CHECK_ARGS=(--device cpu --dtypes fp32 --mechanisms sliding_window lightning --verbose)
    BENCH_ARGS=(--device cpu --preset quick --lengths 256 --masks causal --dtype fp32 --modes fwd
        --mechanisms ${BENCH_MECHANISMS:-sliding_window lightning} --flex sliding_window)
fi
PYTEST_ARGS=(-o addopts= -q -rfEx -p no:cacheprovider --maxfail="${MAXFAIL:-10}" -k cuda tests/kernels/test_cuda.py tests/integration/test_hf_cuda.py tests/contract/test_contract.py tests/contract/test_lse.py)

mkdir -p "$OUT/bench"
SUMMARY=()

# step NAME SECONDS LOGFILE COMMAND...: run under a timeout, log to LOGFILE, remember the outcome
step() {
    local name=$1 secs=$2 log=$3
    shift 3
    echo "== $name (timeout ${secs}s): $*"
    if [ "$DRY" = 1 ]; then
        SUMMARY+=("$name: dry run")
        return
    fi
    local t0=$SECONDS
    timeout -s INT -k 10 "$secs" "$@" >"$log" 2>&1
    local rc=$?
    local what="exit $rc"
    case $rc in
        0) what="ok" ;;
        1) what="FAILURES (exit 1)" ;;
        124 | 130) what="TIMED OUT after ${secs}s (partial results kept)" ;;
        137) what="KILLED after ${secs}s" ;;
    esac
    SUMMARY+=("$name: $what in $((SECONDS - t0))s -> $log")
    tail -n 25 "$log"
}

# 0. carried wheels (fla-core for the fla baseline); nothing is downloaded
if compgen -G "wheels/*.whl" >/dev/null; then
    SITE=/tmp/attnlab-site
    step wheels 120 "$OUT/summary.txt" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" wheels/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH"
else
    SUMMARY+=("wheels: none carried (fla baseline skipped unless fla is installed)")
fi

step check "$CHECK_S" "$OUT/check.txt" "$PY" -m attnlab.cli check "${CHECK_ARGS[@]}"
step pytest "$PYTEST_S" "$OUT/pytest.txt" "$PY" -m pytest "${PYTEST_ARGS[@]}"

BENCH_TMP=$(mktemp -d /tmp/gpu_bench.XXXXXX)
step bench "$BENCH_S" "$OUT/bench/bench.txt" "$PY" -m attnlab.cli bench "${BENCH_ARGS[@]}" --out "$BENCH_TMP"
RUN=$(ls -d "$BENCH_TMP"/*/ 2>/dev/null | head -n 1)
if [ -n "$RUN" ]; then  # results.json/csv as they are; the plots in one file (the 8-file limit)
    cp "$RUN"/results.json "$RUN"/results.csv "$OUT/bench/" 2>/dev/null
    (cd "$RUN" && compgen -G "*.png" >/dev/null && tar cf "$OUT/bench/plots.tar" ./*.png)
fi

[ "$DRY" = 1 ] && { printf '%s\n' "${SUMMARY[@]}"; exit 0; }
{
    echo "gpu_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'), DEVICE=$DEVICE)"
    "$PY" -c 'import torch, sys; print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
        "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "| python", sys.version.split()[0])' 2>&1
    "$PY" -c 'import fla; print("fla", getattr(fla, "__version__", "?"))' 2>/dev/null || echo "fla: not importable"
    printf '%s\n' "${SUMMARY[@]}"
    grep -E "^(FAIL|PASS) |passed, .*failed|^interrupted" "$OUT/check.txt" 2>/dev/null | grep -v "^PASS" | head -n 40
    tail -n 3 "$OUT/pytest.txt" 2>/dev/null
    grep -E "^ERROR |rows failed|interrupted" "$OUT/bench/bench.txt" 2>/dev/null | head -n 20
} >>"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
echo "results under $OUT"
