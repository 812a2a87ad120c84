#!/usr/bin/env bash
# The one command for a lent GPU: end-to-end timings on an SD-1.5-size UNet (issue 13).
#
#   bash bench/gpu_e2e.sh prepare        # HERE, on a machine with PyPI: diffusers' wheel -> .whl/
#   OUT=/some/dir bash bench/gpu_e2e.sh  # THERE, on the GPU machine (carry .whl): default OUT=./gpu_e2e_out
#
# The GPU machine has torch, triton and transformers but no diffusers, and no network: `prepare`
# downloads the pure-Python wheels of diffusers and importlib_metadata (the versions installed here)
# into .whl/ (git-ignored); the device call carries .whl. The run then
# 1. installs the checkout (pip install --no-deps -e .; skipped when importable already) and, if
#    diffusers is missing, the carried wheels into /tmp/site (pip --no-index --no-deps),
# 2. records device, driver and versions                                   -> $OUT/env.txt
# 3. runs bench/gpu_e2e.py (see its docstring: phases, time estimates)     -> $OUT/summary.md,
#    rows.jsonl (one JSON row per measurement, written as they finish), kernel_bench.log,
#    kernel_rows.jsonl, and the whole log                                  -> $OUT/gpu_e2e.log
# GPU_E2E_TOTAL_S (default 480) bounds it: the script gets a budget 30 s below that and is
# interrupted (SIGINT, it then writes the summary of what finished) at the limit. Exit status: the
# script's (0 finished, 130 interrupted, 1 failed).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

if [ "${1:-}" = "prepare" ]; then
  mkdir -p .whl
  versions=$("$PYTHON" - <<'EOF'
from importlib.metadata import version
print(f"diffusers=={version('diffusers')} importlib_metadata=={version('importlib_metadata')}")
EOF
)
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $versions
  ls -l .whl
  exit $?
fi

OUT="${OUT:-./gpu_e2e_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
TOTAL_S="${GPU_E2E_TOTAL_S:-480}"
LOG="$OUT/gpu_e2e.log"
: >"$LOG"
say() { printf '[gpu_e2e.sh] %s\n' "$*" | tee -a "$LOG"; }
say "repo $REPO, OUT $OUT, python $PYTHON, limit ${TOTAL_S}s"

if ! (cd / && "$PYTHON" -c "import adaptive_sampling" >/dev/null 2>&1); then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || say "pip install -e . failed (going on with PYTHONPATH)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import diffusers" >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "diffusers missing: installing the carried wheels $(ls .whl | tr '\n' ' ')"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    say "diffusers is not importable and no .whl/ was carried: run 'bash bench/gpu_e2e.sh prepare' first"
    exit 2
  fi
fi

{
  "$PYTHON" - <<'EOF'
import datetime, platform
import torch
print("date (UTC):", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("python:", platform.python_version(), "| platform:", platform.platform())
print("torch:", torch.__version__, "| CUDA runtime:", torch.version.cuda)
for name in ("triton", "diffusers", "transformers", "huggingface_hub"):
    try:
        print(f"{name}:", __import__(name).__version__)
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("device: CPU only (torch sees no CUDA device): the script runs in CPU tiny mode")
EOF
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

say "running bench/gpu_e2e.py"
env -u TRITON_INTERPRET -u ADAPTIVE_SAMPLING_BACKEND PYTHONUNBUFFERED=1 \
  timeout -s INT -k 30 "$TOTAL_S" "$PYTHON" bench/gpu_e2e.py --out "$OUT" --budget-s "$((TOTAL_S - 30))" "$@" 2>&1 \
  | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "bench/gpu_e2e.py exit status $rc"
exit "$rc"
