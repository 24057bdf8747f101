#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, torch (CUDA build) and nvcc, and no network:
#   bash scripts/gpu_check.sh
# builds the extension with CUDA for the card present, runs the CUDA tests (the CUDA-parametrized op
# and strategy tests: complete graphs up to k*r = 256, the TF32 setting, sync-free calls, the fused path
# against the reference and a call captured in a CUDA graph and replayed), the kernel launches of one
# call counted by the profiler (bench/launch_profile.py; next to the CPU counter's, decaf_launch_count,
# where build/cmake/launch_count.txt is present), the list of
# host-blocking CUDA calls inside one op call (bench/sync_probe.py), the GPU benchmark preset (ring and
# complete) and its agent scaling, a 2-round `decaf-train --device cuda`
# of the offline CLIP pipeline (tiny CLIP, digits), and writes bench/RESULTS.md with the card, the
# versions and the figures. Every step runs under its own time limit (LIMIT_BUILD, LIMIT_TESTS,
# LIMIT_LAUNCHES, LIMIT_SYNCS, LIMIT_BENCH, LIMIT_SCALING, LIMIT_TRAIN seconds; 7.5 minutes in all at
# most); a failed or timed-out step is recorded in RESULTS.md and the script goes on. Exit status:
# 0 when every step passed. Logs: build/gpu_check/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=build/gpu_check
mkdir -p "$LOG"
rm -f "$LOG"/*.rc
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export DECAF_CACHE=${DECAF_CACHE:-$PWD/$LOG/cache}

# step NAME SECONDS COMMAND...: runs COMMAND with its output in $LOG/NAME.log, its exit status in $LOG/NAME.rc
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $(date -u +%H:%M:%S) $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$LOG/$name.rc"
  [ "$rc" = 0 ] || { echo "   $name failed (exit status $rc; 124 = timed out):"; tail -15 "$LOG/$name.log"; }
  return 0
}
status_of() { if [ -f "$LOG/$1.rc" ]; then local rc; rc=$(cat "$LOG/$1.rc"); [ "$rc" = 0 ] && echo "passed" || echo "FAILED (exit status $rc; 124 = timed out)"; else echo "not run"; fi; }
fenced() { echo '```'; grep -v -e '^USDT' -e 'gpuGetDeviceCount' "$LOG/$1.log" 2>/dev/null | tail -"${2:-60}"; echo '```'; }

write_results() {
  {
    echo "# GPU results"
    echo
    echo "Written by \`scripts/gpu_check.sh\` on $(date -u +%Y-%m-%d) (UTC)."
    echo
    echo "- GPU: $(cat "$LOG/gpu.txt" 2>/dev/null)"
    echo "- $(cat "$LOG/torch.txt" 2>/dev/null); nvcc: $(cat "$LOG/nvcc.txt" 2>/dev/null); TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
    echo "- build: $(status_of build)"
    echo "- CUDA tests: $(status_of tests): $(tail -1 "$LOG/tests.log" 2>/dev/null)"
    grep -e '^FAILED' -e '^ERROR' "$LOG/tests.log" 2>/dev/null | sed 's/^/  - /'
    echo "- launch count: $(status_of launches); sync probe: $(status_of syncs); benchmark: $(status_of bench); scaling: $(status_of scaling); training: $(status_of train)"
    if [ "$(cat "$LOG/build.rc" 2>/dev/null)" != 0 ]; then
      echo
      echo "## Build log (last lines)"
      echo
      fenced build 40
    else
    echo
    echo "## bench/launch_profile.py (device ops per consensus_tsvd call; CPU counter's in brackets)"
    echo
    fenced launches 30
    echo
    echo "## bench/sync_probe.py (host-blocking CUDA calls inside one consensus_tsvd call)"
    echo
    fenced syncs 40
    echo
    echo "## bench/tsvd.py --preset gpu"
    echo
    fenced bench 80
    echo
    echo "## Scaling (bench/tsvd.py --preset gpu --scaling 8 16 32 --modules 16)"
    echo
    grep -e '^|' -e 'agents =' "$LOG/scaling.log" 2>/dev/null || fenced scaling 20
    echo
    echo "## decaf-train --device cuda --task clip --model tiny-clip --dataset digits --rounds 2"
    echo
    fenced train 8
    fi
  } > "$LOG/run.md"
  # the newest run on top; every earlier run and the history below it are kept (its first line, the title, goes)
  { cat "$LOG/run.md"; echo; tail -n +2 bench/RESULTS.md 2>/dev/null; } > "$LOG/all.md"
  cp "$LOG/all.md" bench/RESULTS.md
  echo "== $(date -u +%H:%M:%S) bench/RESULTS.md written (earlier runs kept below); commit it"
}

echo "== $(date -u +%H:%M:%S) environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "nvcc not found under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
"$CUDA_HOME/bin/nvcc" --version | tail -1 | tee "$LOG/nvcc.txt"
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee "$LOG/torch.txt"

step build "${LIMIT_BUILD:-150}" env DECAF_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" -m pip install --no-build-isolation --no-deps -e .
if [ "$(cat "$LOG/build.rc")" = 0 ] && ! "$PY" -c 'import decaf_ext.ops, sys; sys.exit(0 if decaf_ext.ops.CUDA_COMPILED else 1)'; then
  echo "the build did not compile the CUDA kernels" >> "$LOG/build.log"
  echo 1 > "$LOG/build.rc"
fi
if [ "$(cat "$LOG/build.rc")" != 0 ]; then write_results; exit 1; fi

TIMEOUT_FLAG=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && TIMEOUT_FLAG=(--timeout=120)
step tests "${LIMIT_TESTS:-80}" "$PY" -m pytest -q -rf -k cuda "${TIMEOUT_FLAG[@]}" python_tests/test_consensus_tsvd.py \
  python_tests/test_ops.py python_tests/test_strategies.py
step launches "${LIMIT_LAUNCHES:-30}" "$PY" bench/launch_profile.py --cpu-table build/cmake/launch_count.txt
step syncs "${LIMIT_SYNCS:-30}" "$PY" bench/sync_probe.py
step bench "${LIMIT_BENCH:-80}" "$PY" bench/tsvd.py --preset gpu --json "$LOG/bench_gpu.json"
step scaling "${LIMIT_SCALING:-30}" "$PY" bench/tsvd.py --preset gpu --scaling 8 16 32 --modules 16 --json "$LOG/scaling_gpu.json"
step train "${LIMIT_TRAIN:-40}" "$PY" -c 'import sys; from decaf_ext.cli import main; sys.exit(main())' --device cuda --task clip \
  --model tiny-clip --dataset digits --rounds 2 --output-dir "$LOG/train"
write_results
for name in build tests launches syncs bench scaling train; do [ "$(cat "$LOG/$name.rc")" = 0 ] || exit 1; done
exit 0
