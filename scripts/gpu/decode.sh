#!/usr/bin/env bash
# The low-latency (decode) layer on a GPU host in one command: builds native/, prints the kernels' registers and
# shared memory, runs the native low-latency smoke on 8 ranks (correctness cases, then graph-replay timings),
# the C# correctness groups of the low-latency layer (gpu-check ll2,ll4,ll8), and the decode sweep
# (`epa2a-tools bench --decode`, graph replays, median and p99 against the copy ceiling of the same run).
# Results go to $OUT (else bench/results); the sweep's table is printed last.
#
#   here, first:   scripts/gpu/run-gpu-tests.sh --prepare      (the .NET runtime and both command lines into .device/)
#   there:         scripts/gpu/decode.sh [bench --decode options, e.g. --decode-tokens 1,128]
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source scripts/gpu/env.sh
RES=${OUT:-$PWD/bench/results}
mkdir -p "$RES"
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
t0=$(date +%s)
if ! { cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release >"$RES/native-configure.log" 2>&1 &&
  cmake --build native/build -j "$(nproc)" >"$RES/native-build.log" 2>&1; }; then
  grep -E "error" -A3 "$RES/native-build.log" | head -60
  tail -20 "$RES/native-configure.log" "$RES/native-build.log"
  exit 1
fi
echo "== native/ built in $(($(date +%s) - t0)) s"
# Registers and shared memory of the low-latency kernels: they set how many blocks an SM keeps resident.
cuobjdump --dump-resource-usage native/build/libepa2a.so 2>&1 | grep -A1 "Function.*ll_.*kernel" | grep -oE "ll_[a-z_]*kernel|REG:[0-9]+|SHARED:[0-9]+|STACK:[0-9]+|LOCAL:[0-9]+" | paste -sd' ' | sed 's/ ll_/\nll_/g' | tee "$RES/ll-resources.txt"

APP=.device/app
export EPA2A_NATIVE_DIR=$PWD/native/build
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
start_mps
rc=0
# The native smoke at 20 blocks a kernel (8 ranks x 20 blocks once waited out its deadline: the layer now caps).
NVSHMEM_SYMMETRIC_SIZE=3G EPA2A_LL_SMS=${EPA2A_LL_SMS:-20} timeout 150 native/build/epa2a_ll_smoke 8 42 "" 1000 >"$RES/ll-smoke.log" 2>&1 || rc=$?
grep -E "PASS|FAIL|^\||passed" "$RES/ll-smoke.log" | tail -40
echo "== ll smoke exit $rc"
NVSHMEM_SYMMETRIC_SIZE=3G timeout 150 dotnet "$APP/epa2a-tools.dll" gpu-check --groups ll2,ll4,ll8 --out "$RES/gpu-check-ll" >"$RES/gpu-check-ll.log" 2>&1
grc=$?
grep -E "^\| ll" "$RES/gpu-check-ll.log" | cut -c1-160 | tail -20
echo "== gpu-check ll exit $grc"
NVSHMEM_SYMMETRIC_SIZE=6G timeout 240 dotnet "$APP/epa2a-tools.dll" bench --decode --out "$RES" "$@" >"$RES/bench-decode.log" 2>&1
brc=$?
grep -v "^\[" "$RES/bench-decode.log" | tail -70
echo "== bench --decode exit $brc"
stop_mps >/dev/null 2>&1
[ "$rc" = 0 ] && [ "$grc" = 0 ] && [ "$brc" = 0 ]
