#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, torch (CUDA build) and nvcc, and no network:
#   bash scripts/gpu_check.sh
# builds the extension with CUDA for the card present, runs the CUDA tests (complete graphs up to
# k*r = 256, the TF32 setting, sync-free calls), the GPU benchmark preset (ring and complete), a
# short `decaf-train --device cuda` run, and writes bench/RESULTS.md with the card, the versions
# and the figures. About 10 minutes on an H100. Each step is logged to build/gpu_check/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=build/gpu_check
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/steps.log"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "nvcc not found under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
"$CUDA_HOME/bin/nvcc" --version | tail -1 | tee "$OUT/nvcc.txt"
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee "$OUT/torch.txt"

step "build (CUDA, arch $TORCH_CUDA_ARCH_LIST)"
DECAF_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log" >&2; exit 1; }
"$PY" -c 'import decaf_ext, sys; sys.exit(0 if decaf_ext.ops.CUDA_COMPILED else 1)'

step "op tests on CPU and CUDA (failures are recorded in RESULTS.md, the script goes on)"
TESTS_RC=0
timeout 600 "$PY" -m pytest -q -rf python_tests/test_consensus_tsvd.py python_tests/test_ops.py \
  > "$OUT/tests.log" 2>&1 || TESTS_RC=$?
tail -1 "$OUT/tests.log"

step "benchmark --preset gpu (ring, complete)"
timeout 420 "$PY" bench/tsvd.py --preset gpu --no-stages --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1 \
  || { tail -40 "$OUT/bench_gpu.log" >&2; exit 1; }
timeout 240 "$PY" bench/tsvd.py --preset gpu --scaling 8 16 32 --modules 16 --json "$OUT/scaling_gpu.json" \
  > "$OUT/scaling_gpu.log" 2>&1 || { tail -40 "$OUT/scaling_gpu.log" >&2; exit 1; }

step "decaf-train --device cuda (2 rounds)"
timeout 300 decaf-train --device cuda --rounds 2 --output-dir "$OUT/train" > "$OUT/train.log" 2>&1 \
  || { tail -40 "$OUT/train.log" >&2; exit 1; }
tail -3 "$OUT/train.log"

step "bench/RESULTS.md"
{
  echo "# GPU results"
  echo
  echo "Written by \`scripts/gpu_check.sh\` on $(date -u +%Y-%m-%d) (UTC)."
  echo
  echo "- GPU: $(cat "$OUT/gpu.txt")"
  echo "- $(cat "$OUT/torch.txt"); nvcc: $(cat "$OUT/nvcc.txt"); TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo "- op tests (exit status $TESTS_RC): $(tail -1 "$OUT/tests.log")"
  grep '^FAILED' "$OUT/tests.log" | sed 's/^/  - /' || true
  echo
  echo "## bench/tsvd.py --preset gpu"
  echo
  echo '```'
  grep -v -e '^USDT' -e 'gpuGetDeviceCount' "$OUT/bench_gpu.log"
  echo '```'
  echo
  echo "## Scaling (bench/tsvd.py --preset gpu --scaling 8 16 32 --modules 16)"
  echo
  grep -e '^|' -e 'agents =' "$OUT/scaling_gpu.log"
  echo
  echo "## decaf-train --device cuda --rounds 2"
  echo
  echo '```'
  tail -5 "$OUT/train.log"
  echo '```'
} > bench/RESULTS.md
step "done: bench/RESULTS.md written; commit it"
exit "$TESTS_RC"
