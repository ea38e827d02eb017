#!/usr/bin/env bash
# Issue 5 on the GPU: a CUDA rank process is SIGKILLed in the middle of stepping; the survivors fail within the
# deadline; the ExpertLayerGrain sees a restarted rank with no NVSHMEM job next to ranks holding the old one and
# tells those to restart too (exit code 75: NVSHMEM cannot be initialized twice in a process); a supervisor loop
# starts every exited silo again; the group then bootstraps one fresh NVSHMEM job and checked steps succeed again.
#   scripts/gpu/gpu-restart.sh [ranks=4] [pause between steps in ms=0] [epa2a command, default: dotnet .device/app/epa2a.dll]
# With no pause between steps the kill lands inside a step (a step is in flight nearly all the time).
# Membership: localhost clustering with a separate anchor silo as primary (--primary-port), so that every rank
# can restart. Expects native/build/libepa2a.so.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source scripts/gpu/env.sh
RANKS=${1:-4}
PAUSE=${2:-0}
EPA2A=${3:-"dotnet .device/app/epa2a.dll"}
LOG=${OUT:-/tmp/epa2a-out}/restart
mkdir -p "$LOG"
export EPA2A_NATIVE_DIR=$PWD/native/build NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-2G}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
ANCHOR=$((21000 + RANDOM % 2000))
BASE=$((ANCHOR + 300))
STOP=$LOG/stop
rm -f "$STOP"
start_mps
$EPA2A silo --rank 0 --world-size 1 --group anchor --port-base "$ANCHOR" >"$LOG/anchor.log" 2>&1 &
anchor=$!
sleep 3
supervise() {
  local r=$1
  while [ ! -f "$STOP" ]; do
    $EPA2A silo --rank "$r" --world-size "$RANKS" --group gpu --backend cuda --gpu 0 --port-base "$BASE" \
      --primary-port "$ANCHOR" >>"$LOG/silo$r.log" 2>&1
    local rc=$?
    echo "$(date +%s.%N) rank $r exited with $rc" >>"$LOG/supervisor.log"
    sleep 0.5
  done
}
sups=()
for ((r = 0; r < RANKS; r++)); do supervise "$r" & sups+=($!); done
t0=$(date +%s.%N)
timeout 300 $EPA2A drive --world-size "$RANKS" --group gpu --port-base "$BASE" --steps 400 --continue-on-failure \
  --interval-ms "$PAUSE" --max-tokens 256 --hidden 2048 --topk 8 --experts 64 --timeout-seconds 5 >"$LOG/drive.log" 2>&1 &
drive=$!
for _ in $(seq 1 240); do grep -q "^step 5: ok" "$LOG/drive.log" && break; sleep 0.5; done
victim=$(pgrep -f "silo --rank 2 --world-size $RANKS --group gpu" | head -1)
tk=$(date +%s.%N)
kill -9 "$victim"
echo "== SIGKILL rank 2 (pid $victim) at +$(awk "BEGIN{printf \"%.1f\", $tk - $t0}") s"
wait "$drive"

touch "$STOP"
pkill -f "group gpu --backend cuda" ; kill "$anchor" 2>/dev/null
wait "${sups[@]}" 2>/dev/null
stop_mps >/dev/null 2>&1
echo "== drive:"
cat "$LOG/drive.log" | cut -c1-260 | grep -v "^|" | tail -70
echo "== supervisor:"
awk -v t="$tk" '{printf "+%.1f s after the kill: %s\n", $1 - t, substr($0, index($0, $2))}' "$LOG/supervisor.log"
grep -h "leaves NVSHMEM\|restart for a fresh\|joined NVSHMEM" "$LOG"/silo*.log | cut -c1-220 | tail -20
# Pass: steps failed after the kill (none hung: the drive finished within its bound) and the last 5 were checked ok.
failed=$(grep -c "FAILED" "$LOG/drive.log")
lastok=$(grep -E "^step [0-9]+:" "$LOG/drive.log" | tail -5 | grep -c ": ok")
echo "== $failed failed steps; last 5 steps: $lastok ok"
[ "$failed" -gt 0 ] && [ "$lastok" = 5 ]
