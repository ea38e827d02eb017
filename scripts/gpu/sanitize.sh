#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over the native smoke, the low-latency smoke and a
# small gpu-check, on a GPU host. Every rank process is followed (--target-processes all). Prints one markdown
# table last (tool, program, cases, the sanitizer's error summary per process, wall time) and writes it with the
# full logs to $OUT (else ./sanitize-results).
#
#   scripts/gpu/sanitize.sh [tools=memcheck,racecheck,synccheck,initcheck] [native groups=2,4,8] [gpu-check groups=w2]
#
# Every rank process, of the smokes and of gpu-check, runs under a sanitizer of its own with its own log, so each
# summary counted is one rank's kernels. SANITIZE_BUDGET_S (default 540) bounds the call: runs that would start
# after it are listed as not run.
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
# One table row from the sanitizer logs given: errors summed over every ERROR SUMMARY in them.
row() { # tool name rc limit t0 what logs...
  local tool=$1 name=$2 rc=$3 limit=$4 t0=$5 what=$6
  shift 6
  local summaries=0 errors=0 verdict
  if [ $# -gt 0 ]; then # (cat with no file would read stdin)
    # memcheck, synccheck and initcheck end with "ERROR SUMMARY: N errors"; racecheck with
    # "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)".
    summaries=$(cat "$@" 2>/dev/null | grep -cE "(ERROR|RACECHECK) SUMMARY")
    errors=$(cat "$@" 2>/dev/null | grep -oE "ERROR SUMMARY: [0-9]+ error|RACECHECK SUMMARY: [0-9]+ hazards displayed \([0-9]+ error" |
      awk '{n = $NF == "error" ? $(NF - 1) : $3; sub(/\(/, "", n); s += n} END {print s + 0}')
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
IFS=, read -ra checks <<<"$GROUPS_CHECK"
# The whole call's budget (the device tool stops a call at 10 minutes): a run that would start past it is listed
# as not run, so that the table always comes back.
BUDGET=${SANITIZE_BUDGET_S:-540}
T_START=$(date +%s)
budget_left() { echo $((BUDGET - ($(date +%s) - T_START))); }
skip() { rows+=("| $1 | $2 | not run: the call's budget (${BUDGET} s) was spent | - | - |"); echo "${rows[-1]}"; }
for tool in "${tools[@]}"; do
  # The smokes' rank processes run this program again under their own sanitizer (EPA2A_RANK_WRAPPER, read by
  # native/tests/rank_process.h); EPA2A_SMOKE_LIMIT_S gives their group the sanitized time.
  for fam in "intra bf16" inter; do
    name="native-smoke-${fam// /-}-$GROUPS_NATIVE"
    if [ "$(budget_left)" -lt 60 ]; then skip "$tool" "$name"; continue; fi
    lim=$(($(budget_left) < 240 ? $(budget_left) : 240))
    EPA2A_SMOKE_LIMIT_S=$((lim - 10)) run_ranks "$tool" "$name" "$lim" native/build/epa2a_smoke "$GROUPS_NATIVE" 42 "$fam"
  done
  if [ -x native/build/epa2a_ll_smoke ]; then
    name="ll-smoke-fp8-$GROUPS_NATIVE"
    if [ "$(budget_left)" -lt 60 ]; then skip "$tool" "$name"; else
      lim=$(($(budget_left) < 240 ? $(budget_left) : 240))
      EPA2A_SMOKE_LIMIT_S=$((lim - 10)) run_ranks "$tool" "$name" "$lim" native/build/epa2a_ll_smoke "$GROUPS_NATIVE" 42 "fp8" 10
    fi
  fi
  if [ -n "$APP" ]; then
    for g in "${checks[@]}"; do
      name="gpu-check-$g"
      if [ "$(budget_left)" -lt 60 ]; then skip "$tool" "$name"; continue; fi
      lim=$(($(budget_left) < 300 ? $(budget_left) : 300))
      run_ranks "$tool" "$name" "$lim" dotnet $APP/epa2a-tools.dll gpu-check --groups "$g" \
        --group-timeout-seconds $((lim - 15)) --out "$LOG/gpu-check-$tool-$g"
    done
  fi
done
{
  echo "# compute-sanitizer on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), $(date -u +%F)"
  echo
  echo "compute-sanitizer $(compute-sanitizer --version | grep -o 'Version [0-9.]*' | head -1); each rank process under a sanitizer of its own (EPA2A_RANK_WRAPPER), one summary per rank process; scripts/gpu/sanitize.sh $TOOLS $GROUPS_NATIVE $GROUPS_CHECK."
  echo
  echo "| tool | program (cases) | result | exit | wall |"
  echo "| --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$LOG/sanitize.md"
# The device tool brings back only a few files a call: the logs travel as one archive beside the table.
if [ -n "${OUT:-}" ]; then
  (cd "$LOG" && find . -name '*.log' -o -name '*.json' -o -name 'gpu-check-*.md' | sort | tar czf logs.tar.gz -T - --remove-files 2>/dev/null)
  find "$LOG" -mindepth 1 -type d -empty -delete 2>/dev/null
fi
