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
  row "$tool" "$name" "$rc" "$limit" "$t0" "processes" "$log"
}
# One table row from the sanitizer logs given: errors summed over every ERROR SUMMARY in them.
row() { # tool name rc limit t0 what logs...
  local tool=$1 name=$2 rc=$3 limit=$4 t0=$5 what=$6
  shift 6
  local summaries=0 errors=0 verdict
  if [ $# -gt 0 ]; then # (cat with no file would read stdin)
    summaries=$(cat "$@" 2>/dev/null | grep -c "ERROR SUMMARY")
    errors=$(cat "$@" 2>/dev/null | grep -o "ERROR SUMMARY: [0-9]* error" | awk '{s += $3} END {print s + 0}')
  fi
  verdict="$errors errors in $summaries $what"
  [ "$rc" = 124 ] && verdict="$verdict; TIMED OUT after ${limit}s"
  [ "$summaries" = 0 ] && verdict="no sanitizer summary in $# logs (rc $rc)"
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
  shopt -s nullglob
  local logs=("$LOG/$tool-$name"-rank-*.log)
  shopt -u nullglob
  row "$tool" "$name (each rank under its own sanitizer)" "$rc" "$limit" "$t0" "of ${#logs[@]} rank processes" "${logs[@]}"
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
