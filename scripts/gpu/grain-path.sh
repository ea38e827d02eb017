#!/usr/bin/env bash
# The whole path on a GPU host: N `epa2a silo --backend cuda` processes (one per rank, all on GPU 0 under MPS,
# localhost clustering), rank placement by silo metadata, the NVSHMEM bootstrap through the ExpertLayerGrain
# (rank 0 makes the unique id, the coordinator hands it to every rank), then checked steps through the grains
# from an `epa2a drive` client process (each step compared with the reference).
#   scripts/gpu/grain-path.sh [ranks=4] [steps=5] [epa2a command, default: dotnet .device/app/epa2a.dll]
# Expects native/build/libepa2a.so (scripts/gpu/native-smoke.sh or the cmake line in README.md builds it).
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source scripts/gpu/env.sh
RANKS=${1:-4}
STEPS=${2:-5}
EPA2A=${3:-"dotnet .device/app/epa2a.dll"}
LOG=${OUT:-/tmp/epa2a-out}
mkdir -p "$LOG"
export EPA2A_NATIVE_DIR=$PWD/native/build NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-2G}
PORT=$((21000 + RANDOM % 4000))
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; }
trap cleanup EXIT
for ((r = 0; r < RANKS; r++)); do
  $EPA2A silo --rank "$r" --world-size "$RANKS" --group gpu --backend cuda --gpu 0 --port-base "$PORT" >"$LOG/silo$r.log" 2>&1 &
  pids+=($!)
done
for ((r = 0; r < RANKS; r++)); do
  for _ in $(seq 1 120); do grep -q "epa2a silo: rank" "$LOG/silo$r.log" && break; sleep 0.5; done
done
timeout 300 $EPA2A drive --world-size "$RANKS" --group gpu --port-base "$PORT" --steps "$STEPS" \
  --max-tokens 512 --hidden 2048 --topk 8 --experts 64 --timeout-seconds 30 2>&1 | tee "$LOG/drive.log"
rc=${PIPESTATUS[0]}
echo "== grain path on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1): ranks $RANKS, exit $rc"
grep -h "joined NVSHMEM\|layer .* created" "$LOG"/silo*.log | head -20
exit "$rc"
