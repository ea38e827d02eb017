#!/usr/bin/env bash
# Issue 14's repeat of the full-size local-combine cases (32768 x 1536, top-8 of 384, drop .3: about 184k rows a
# rank): gpu-check's big group filtered to them, N times with fresh seeds (101, 102, ...), one line a run; stops
# starting runs after LIMIT seconds so that a device call keeps what it ran.
#   there:   scripts/gpu/lc-repeat.sh [N=20] [LIMIT=520]      (.device carried; scripts/gpu/run-gpu-tests.sh --prepare)
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source scripts/gpu/env.sh
N=${1:-20}
LIMIT=${2:-520}
RES=${OUT:-$PWD/gpu-check-results}
mkdir -p "$RES"
{ cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release && cmake --build native/build -j "$(nproc)"; } >"$RES/native-build.log" 2>&1 ||
  { tail -20 "$RES/native-build.log"; exit 1; }
export EPA2A_NATIVE_DIR=$PWD/native/build NVSHMEM_REMOTE_TRANSPORT=none
start_mps >/dev/null
t0=$(date +%s)
pass=0 runs=0
echo "| run | seed | result | wall s |"
echo "| --- | --- | --- | --- |"
for i in $(seq 1 "$N"); do
  [ $(($(date +%s) - t0)) -lt "$LIMIT" ] || break
  s=$((100 + i)) t1=$(date +%s)
  dotnet .device/app/epa2a-tools.dll gpu-check --groups big --filter 32768x1536 --seed $s --out "$RES/lc-$s" >"$RES/lc-$s.log" 2>&1
  rc=$?
  runs=$((runs + 1))
  res=$(grep -E "^\| 32768" "$RES/lc-$s.log" | awk -F'|' '{print $NF, $(NF-1)}' | tr -s ' ' | paste -sd';')
  [ "$rc" = 0 ] && pass=$((pass + 1))
  echo "| $i | $s | exit $rc:${res:- $(grep -m1 -iE 'error|illegal' "$RES/lc-$s.log" | cut -c1-160)} | $(($(date +%s) - t1)) |"
done
stop_mps >/dev/null 2>&1
echo "== $pass of $runs runs passed"
[ "$pass" = "$runs" ]
