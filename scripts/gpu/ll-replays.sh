#!/usr/bin/env bash
# The low-latency layer's 1-token graph replays, long: 3 x 5000 iterations (12 timed phases each) at 32 and 16
# blocks a kernel asked, 8 ranks under MPS. At 20 and 32 blocks (some SMs holding blocks of two ranks) about one run
# in three ended in a 5 s timeout, a receiver never seeing a signal the memory held; the layer now caps the blocks
# at one an SM for all ranks on a GPU, and this is the regression run of that.
#   there:   scripts/gpu/ll-replays.sh [iterations]      (builds native/; logs in $OUT or native/results)
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source scripts/gpu/env.sh
RES=${OUT:-$PWD/native/results}
mkdir -p "$RES"
ITERS=${1:-5000}
if ! { cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release >"$RES/native-configure.log" 2>&1 &&
  cmake --build native/build -j "$(nproc)" >"$RES/native-build.log" 2>&1; }; then
  grep -E "error" -A3 "$RES/native-build.log" | head -40
  exit 1
fi
start_mps
fails=0
for rep in 1 2 3; do
  for sms in 32 16; do
    f=$RES/ll-replays-$sms-$rep.log
    NVSHMEM_SYMMETRIC_SIZE=3G EPA2A_LL_SMS=$sms timeout 80 native/build/epa2a_ll_smoke 8 $((40 + rep)) "timed 1 tok" "$ITERS" >"$f" 2>&1
    rc=$?
    [ "$rc" = 0 ] || fails=$((fails + 1))
    echo "| $sms blocks | run $rep | $ITERS replays | exit $rc | $(grep -cE 'timed out' "$f") timeouts | $(grep -m1 -oE 'it [0-9]+ phase [0-9]+' "$f") |"
  done
done
stop_mps >/dev/null 2>&1
echo "== $fails of 6 runs failed"
[ "$fails" = 0 ]
