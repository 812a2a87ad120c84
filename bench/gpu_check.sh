#!/usr/bin/env bash
# The one script to run on a lent GPU for the skip kernel (issue 3).
#
#   OUT=/some/dir bash bench/gpu_check.sh          # default OUT=./gpu_out
#
# 1. installs the checkout (pip install --no-deps -e .; skipped when it is importable already),
# 2. records device, driver, torch, triton and CUDA versions            -> $OUT/env.txt
# 3. runs tests/test_kernel.py with compiled Triton on the GPU
#    (TRITON_INTERPRET=0 ADAPTIVE_SAMPLING_TEST_DEVICE=cuda): kernel vs reference property tests,
#    dispatch tests, torch/triton mask equality on the sampling workloads, the D2H sync count
#                                                                        -> $OUT/tests.log, tests_junit.xml
# 4. runs the benchmarks (bench/bench_skip_kernel.py)                    -> $OUT/bench.log, bench.json,
#                                                     bench_rows.jsonl (survives a timeout), bench_junit.xml
# 5. writes the markdown summary (bench/summarize.py)                    -> $OUT/summary.md
#
# A failing step is recorded ($OUT/status.txt) and the script goes on; it exits 1 at the end if
# any step failed. Everything is sized to finish in under 6 minutes on an H100/H200
# (GPU_CHECK_TOTAL_S, default 330, bounds the whole run; each step has its own timeout).
# Without a GPU it runs the same steps in CPU mode (Triton interpreter for the tests; the CUDA-only
# benchmarks skip themselves), which is how the script is checked on development machines.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
TOTAL_S="${GPU_CHECK_TOTAL_S:-330}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: >"$LOG"
FAILURES=()

elapsed() { echo $(($(date +%s) - START)); }
say() { printf '[gpu_check +%4ss] %s\n' "$(elapsed)" "$*" | tee -a "$LOG"; }

# run_step NAME TIMEOUT_S LOGFILE CMD...: run with a timeout (SIGINT first, so pytest still
# writes its junit/JSON files), record a non-zero exit status, never stop the script.
run_step() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  if [ "$limit" -lt 10 ]; then
    say "SKIP $name: only ${limit}s of the ${TOTAL_S}s budget left"
    FAILURES+=("$name (no time left)")
    return 0
  fi
  say "start $name (timeout ${limit}s, log $(basename "$logfile"))"
  local rc=0
  timeout -s INT -k 20 "$limit" "$@" >"$logfile" 2>&1 || rc=$?
  say "end   $name: exit status $rc"
  if [ "$rc" -ne 0 ]; then FAILURES+=("$name (exit status $rc, see $(basename "$logfile"))"); fi
  return 0
}
left() { echo $((TOTAL_S - $(elapsed) - ${1:-0})); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

say "repo $REPO, OUT $OUT, python $PYTHON"

# 1. install (the GPU machine has no network: no build isolation, no dependencies)
if (cd / && "$PYTHON" -c "import adaptive_sampling" >/dev/null 2>&1); then
  say "adaptive_sampling is importable already; not reinstalling"
else
  run_step "pip install -e ." "$(min 60 "$(left 250)")" "$OUT/pip_install.log" \
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" # the tests import from the checkout either way

# 2. environment
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
run_step "environment" 30 "$OUT/env.txt" "$PYTHON" - <<'EOF'
import datetime, os, platform, subprocess
import torch
print("date (UTC):", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("python:", platform.python_version(), "| platform:", platform.platform())
print("torch:", torch.__version__, "| CUDA runtime:", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed")
try:
    print("git commit:", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "-")
except OSError:
    print("git commit: -")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.1f} GiB",
          "| memory clock kHz", getattr(p, "memory_clock_rate", "-"), "| bus width bits", getattr(p, "memory_bus_width", "-"))
else:
    print("device: CPU only (torch sees no CUDA device)")
print("TRITON_INTERPRET:", os.environ.get("TRITON_INTERPRET"), "| ADAPTIVE_SAMPLING_BACKEND:", os.environ.get("ADAPTIVE_SAMPLING_BACKEND"))
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >>"$OUT/env.txt" 2>&1 || true
fi
cat "$OUT/env.txt" | tee -a "$LOG"

if [ "$HAS_CUDA" = "1" ]; then
  TEST_ENV=(TRITON_INTERPRET=0 ADAPTIVE_SAMPLING_TEST_DEVICE=cuda)
  say "mode: CUDA (compiled Triton)"
else
  TEST_ENV=(TRITON_INTERPRET=1 ADAPTIVE_SAMPLING_TEST_DEVICE=cpu)
  say "mode: CPU (no CUDA device): Triton interpreter for the tests, CUDA-only benchmarks skip"
fi

# 3. correctness on the device
run_step "tests/test_kernel.py" "$(min 140 "$(left 150)")" "$OUT/tests.log" \
  env -u ADAPTIVE_SAMPLING_BACKEND "${TEST_ENV[@]}" "$PYTHON" -m pytest tests/test_kernel.py -q -ra \
  -p no:cacheprovider --durations=10 --junitxml="$OUT/tests_junit.xml"
tail -n 15 "$OUT/tests.log" | tee -a "$LOG"

# 4. benchmarks: a budget inside pytest (BENCH_BUDGET_S) ends them cleanly before the timeout
rm -f "$OUT/bench_rows.jsonl"
BENCH_LIMIT=$(min 170 "$(left 15)")
run_step "bench/bench_skip_kernel.py" "$BENCH_LIMIT" "$OUT/bench.log" \
  env -u ADAPTIVE_SAMPLING_BACKEND TRITON_INTERPRET=0 \
  BENCH_BUDGET_S="$((BENCH_LIMIT - 40))" BENCH_COMPILE_BUDGET_S="${BENCH_COMPILE_BUDGET_S:-60}" \
  BENCH_JSONL="$OUT/bench_rows.jsonl" \
  "$PYTHON" -m pytest bench/bench_skip_kernel.py -q -ra -p no:cacheprovider \
  --benchmark-enable --benchmark-json="$OUT/bench.json" \
  --benchmark-min-rounds=5 --benchmark-max-time=0.1 --benchmark-warmup=on --benchmark-warmup-iterations=3 \
  --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name --junitxml="$OUT/bench_junit.xml"
tail -n 8 "$OUT/bench.log" | tee -a "$LOG"

# 5. summary
run_step "summary" 30 "$OUT/summarize.log" "$PYTHON" bench/summarize.py \
  --bench-json "$OUT/bench.json" --bench-jsonl "$OUT/bench_rows.jsonl" --junit "$OUT/tests_junit.xml" --junit "$OUT/bench_junit.xml" \
  --env "$OUT/env.txt" --out "$OUT/summary.md"

{
  echo "finished after $(elapsed) s"
  if [ "${#FAILURES[@]}" -eq 0 ]; then
    echo "all steps passed"
  else
    echo "FAILED steps:"
    printf '  %s\n' "${FAILURES[@]}"
  fi
} | tee "$OUT/status.txt" | tee -a "$LOG"
if [ -f "$OUT/summary.md" ]; then
  printf '\n## gpu_check status\n\n```\n%s\n```\n' "$(cat "$OUT/status.txt")" >>"$OUT/summary.md"
fi
[ "${#FAILURES[@]}" -eq 0 ]
