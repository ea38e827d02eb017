#!/usr/bin/env bash
# Builds native/ and runs the low-latency layer's multi-process smoke test on a GPU host (ranks share the
# GPU(s) under MPS): correctness cases on W = 2, 4, 8 and, on 8 ranks, graph-replay timings at 1 and 128
# tokens (hidden 7168, top-8 of 256). Prints the build summary, one line a case, then the timing table.
#   scripts/gpu/ll-smoke.sh [groups=2,4,8] [seed=42] [case-name filter] [timed iterations=1000]
# Logs go to $OUT (the device tool's output folder) or /tmp/epa2a-out.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source scripts/gpu/env.sh
LOG=${OUT:-/tmp/epa2a-out}
mkdir -p "$LOG"
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "== nvcc $(nvcc --version | grep -o 'release [0-9.]*'), NVSHMEM_HOME=$NVSHMEM_HOME"
if ! cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release >"$LOG/configure.log" 2>&1; then
  tail -40 "$LOG/configure.log"
  exit 1
fi
if ! cmake --build native/build -j "$(nproc)" >"$LOG/build.log" 2>&1; then
  grep -E "error|Error" -A3 "$LOG/build.log" | head -80
  tail -20 "$LOG/build.log"
  exit 1
fi
grep -iE "warning" "$LOG/build.log" | sort -u | head -20
echo "== built: $(nm -D --defined-only native/build/libepa2a.so | grep -c ' T epa2a_ll_') exported epa2a_ll_* functions"
start_mps
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-3G}
timeout 500 native/build/epa2a_ll_smoke "${1:-2,4,8}" "${2:-42}" "${3:-}" "${4:-1000}" 2>&1 | tee "$LOG/ll-smoke.log"
rc=${PIPESTATUS[0]}
stop_mps >/dev/null 2>&1
exit "$rc"
