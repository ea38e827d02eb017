#!/usr/bin/env bash
# `epa2a-tools bench` on a GPU host in one command: builds native/ (CMake), gets the epa2a-tools CLI, starts MPS, optionally
# runs a quick gpu-check first (--check GROUPS), runs the bench (CUDA rank processes, the PyTorch peer, the CPU
# backend, the grain path), stops MPS and prints the table last. Results go to $OUT (else bench/results).
#
#   On a GPU host with the .NET SDK:   scripts/gpu/bench.sh [--check w8,inter] [bench options]
#   For a GPU host without .NET (the device tool): here, first   scripts/gpu/run-gpu-tests.sh --prepare
#     then run this script there with .device carried.
set -uo pipefail
cd "$(dirname "$0")/../.."
CHECK=
if [ "${1:-}" = "--check" ]; then CHECK=$2; shift 2; fi

# shellcheck source=/dev/null
source scripts/gpu/env.sh
RES=${OUT:-$PWD/bench/results}
mkdir -p "$RES"
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
t0=$(date +%s)
if ! { cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release >"$RES/native-configure.log" 2>&1 &&
  cmake --build native/build -j "$(nproc)" >"$RES/native-build.log" 2>&1; }; then
  grep -E "error|Error" -A3 "$RES/native-build.log" | head -60
  tail -20 "$RES/native-configure.log" "$RES/native-build.log"
  exit 1
fi
echo "== native/ built in $(($(date +%s) - t0)) s"

if [ -f .device/app/epa2a-tools.dll ]; then
  APP=.device/app
else
  APP=artifacts/bench
  dotnet publish src/EpA2A.Tools -c Release -o "$APP" -v:q -nologo >"$RES/publish.log" 2>&1 || { tail -30 "$RES/publish.log"; exit 1; }
fi

export EPA2A_NATIVE_DIR=$PWD/native/build
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-6G}
# Every rank is on this one node: NVSHMEM needs no remote transport (and no proxy thread polling for it).
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
start_mps
rc=0
if [ -n "$CHECK" ]; then
  dotnet "$APP/epa2a-tools.dll" gpu-check --groups "$CHECK" --out "$RES/gpu-check" >"$RES/gpu-check.log" 2>&1
  rc=$?
  grep -E "^\|" "$RES/gpu-check.log" | tail -20
  echo "== gpu-check exit $rc"
fi
if [ "$rc" = 0 ]; then
  dotnet "$APP/epa2a-tools.dll" bench --out "$RES" "$@" 2>&1 | tee "$RES/bench.log" | grep -v "^\[" | tail -120
  rc=${PIPESTATUS[0]}
fi
stop_mps >/dev/null 2>&1
exit "$rc"
