#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over the native smoke, the low-latency smoke and a
# small gpu-check, on a GPU host. Every rank process is followed (--target-processes all). Prints one markdown
# table last (tool, program, cases, the sanitizer's error summary per process, wall time) and writes it with the
# full logs to $OUT (else ./sanitize-results).
#
#   scripts/gpu/sanitize.sh [tools=memcheck,racecheck,synccheck,initcheck] [native groups=2,4,8] [gpu-check groups=w2]
#
# The cases are the small ones (sanitized kernels run 10-100x slower): the native smoke's "intra bf16" family (plain,
# local combine, scatter indices, odd hidden), its inter-node cases, the LL smoke's fp8/bf16/graph cases, and the
# gpu-check group given (host API, device API, graph mode). Needs native/build (it builds it when missing) and, for
# gpu-check, .device/app (scripts/gpu/run-gpu-tests.sh --prepare) or the .NET SDK.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source scripts/gpu/env.sh
TOOLS=${1:-memcheck,racecheck,synccheck,initcheck}
GROUPS_NATIVE=${2:-2,4,8}
GROUPS_CHECK=${3:-w2}
LOG=${OUT:-$PWD/sanitize-results}
mkdir -p "$LOG"
if [ ! -x native/build/epa2a_smoke ]; then
  { cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release && cmake --build native/build -j "$(nproc)"; } >"$LOG/build.log" 2>&1 ||
    { tail -30 "$LOG/build.log"; exit 1; }
fi
APP=.device/app
[ -f $APP/epa2a-tools.dll ] || APP=""
export EPA2A_NATIVE_DIR=$PWD/native/build NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-2G}
# No MPS: under MPS compute-sanitizer cannot attach (cudaSetDevice fails with cudaErrorDevicesUnavailable, seen on the
# H200 2026-12-03), so the ranks time-slice the GPU here: slow, but every wait still completes.
stop_mps >/dev/null 2>&1
rows=()
run() { # tool name timeout command...
  local tool=$1 name=$2 limit=$3
  shift 3
  local log="$LOG/$tool-$name.log" t0 rc
  t0=$(date +%s)
  timeout "$limit" compute-sanitizer --tool "$tool" --target-processes all --print-limit 20 "$@" >"$log" 2>&1
  rc=$?
  local summaries errors
  summaries=$(grep -c "ERROR SUMMARY" "$log")
  errors=$(grep -o "ERROR SUMMARY: [0-9]* error" "$log" | awk '{s += $3} END {print s + 0}')
  local verdict="$errors errors in $summaries processes"
  [ "$rc" = 124 ] && verdict="$verdict; TIMED OUT after ${limit}s"
  [ "$summaries" = 0 ] && verdict="no sanitizer summary (rc $rc)"
  rows+=("| $tool | $name | $verdict | exit $rc | $(($(date +%s) - t0)) s |")
  echo "${rows[-1]}"
}
# gpu-check's ranks are processes it starts itself: each runs under a sanitizer of its own (EPA2A_RANK_WRAPPER, read
# by src/EpA2A.Tools/RankProcesses.cs) with its own log file, so that every rank's summary is counted, not only the
# parent's.
run_ranks() { # tool name timeout command...
  local tool=$1 name=$2 limit=$3
  shift 3
  local log="$LOG/$tool-$name.log" t0 rc
  t0=$(date +%s)
  rm -f "$LOG/$tool-$name"-rank-*.log
  EPA2A_RANK_WRAPPER="compute-sanitizer --tool $tool --print-limit 20 --log-file $LOG/$tool-$name-rank-%p.log" \
    timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  local summaries errors files
  files=$(ls "$LOG/$tool-$name"-rank-*.log 2>/dev/null | wc -l)
  summaries=$(cat "$LOG/$tool-$name"-rank-*.log 2>/dev/null | grep -c "ERROR SUMMARY")
  errors=$(cat "$LOG/$tool-$name"-rank-*.log 2>/dev/null | grep -o "ERROR SUMMARY: [0-9]* error" | awk '{s += $3} END {print s + 0}')
  local verdict="$errors errors in $summaries of $files rank processes"
  [ "$rc" = 124 ] && verdict="$verdict; TIMED OUT after ${limit}s"
  [ "$summaries" = 0 ] && verdict="no sanitizer summary from $files rank logs (rc $rc)"
  rows+=("| $tool | $name (each rank under its own sanitizer) | $verdict | exit $rc | $(($(date +%s) - t0)) s |")
  echo "${rows[-1]}"
}
IFS=, read -ra tools <<<"$TOOLS"
for tool in "${tools[@]}"; do
  run "$tool" native-smoke-intra 150 native/build/epa2a_smoke "$GROUPS_NATIVE" 42 "intra bf16"
  run "$tool" native-smoke-inter 150 native/build/epa2a_smoke "$GROUPS_NATIVE" 42 "inter"
  if [ -x native/build/epa2a_ll_smoke ]; then
    run "$tool" ll-smoke 150 native/build/epa2a_ll_smoke "$GROUPS_NATIVE" 42 "fp8" 10
  fi
  if [ -n "$APP" ] && [ "$tool" = memcheck ]; then
    run_ranks "$tool" gpu-check-"$GROUPS_CHECK" 300 dotnet $APP/epa2a-tools.dll gpu-check --groups "$GROUPS_CHECK" --out "$LOG/gpu-check-$tool"
  fi
done
{
  echo "# compute-sanitizer on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), $(date -u +%F)"
  echo
  echo "compute-sanitizer $(compute-sanitizer --version | grep -o 'Version [0-9.]*' | head -1); every rank process followed (--target-processes all); scripts/gpu/sanitize.sh $TOOLS $GROUPS_NATIVE $GROUPS_CHECK."
  echo
  echo "| tool | program (cases) | result | exit | wall |"
  echo "| --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$LOG/sanitize.md"
