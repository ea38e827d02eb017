#!/usr/bin/env bash
# Builds native/ (libepa2a.so + epa2a_smoke) and runs the multi-process smoke test on a GPU host, the rank
# processes sharing the GPU(s) under MPS. Prints the build summary, then one table last.
#   scripts/gpu/native-smoke.sh [groups=2,4,8,big] [seed=42] [case-name filter]   (big: the original's documented sizes, 8 ranks)
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
echo "== built: $(ls -la native/build/libepa2a.so | awk '{print $5}') bytes, $(nm -D --defined-only native/build/libepa2a.so | grep -c ' T epa2a_') exported epa2a_* functions"
start_mps
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-3G}
timeout 390 native/build/epa2a_smoke "${1:-2,4,8,big}" "${2:-42}" ${3:+"$3"} 2>&1 | tee "$LOG/smoke.log"
rc=${PIPESTATUS[0]}
stop_mps >/dev/null 2>&1
exit "$rc"
