#!/usr/bin/env bash
# The CUDA backend's GPU suite in one command: builds native/ (CMake), gets the epa2a-tools CLI, starts MPS, runs
# `epa2a-tools gpu-check` (every group: rank processes on the GPU, each case checked against the reference and the
# CPU backend, the fault case, timings), stops MPS, prints the table last. Results (gpu-check.json, .md, logs)
# go to $OUT, else gpu-check-results/.
#
#   On a GPU host with the .NET SDK:   scripts/gpu/run-gpu-tests.sh [gpu-check options, e.g. --groups w2,w4]
#   For a GPU host without .NET (the device tool): here, first   scripts/gpu/run-gpu-tests.sh --prepare
#     (packs the .NET runtime into .device/ and publishes both command lines into .device/app), then run the same script
#     there with .device carried; scripts/gpu/env.sh unpacks the runtime.
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p .device
  dn=$(dirname "$(readlink -f "$(command -v dotnet)")")
  ver=$(ls "$dn/shared/Microsoft.NETCore.App" | sort -V | tail -1)
  if [ "$(cat .device/dotnet-rt.version 2>/dev/null)" != "$ver" ] || [ ! -f .device/dotnet-rt.tar.xz ]; then
    (cd "$dn" && tar -cJf "$OLDPWD/.device/dotnet-rt.tar.xz" dotnet host "shared/Microsoft.NETCore.App/$ver")
    echo "$ver" >.device/dotnet-rt.version
  fi
  rm -rf .device/app
  # Both command lines into one folder: epa2a (silo, local, drive, step) and epa2a-tools (gpu-check, bench, soak).
  for p in src/EpA2A.Silo src/EpA2A.Tools; do
    dotnet publish "$p" -c Release -r linux-x64 --self-contained false -o .device/app \
      -p:DebugType=none -p:GenerateDocumentationFile=false -v:q -nologo
  done
  du -sh .device .device/app
  exit 0
fi

# shellcheck source=/dev/null
source scripts/gpu/env.sh
LOG=${OUT:-$PWD/gpu-check-results}
mkdir -p "$LOG"
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
t0=$(date +%s)
if ! { cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release >"$LOG/native-configure.log" 2>&1 &&
  cmake --build native/build -j "$(nproc)" >"$LOG/native-build.log" 2>&1; }; then
  tail -40 "$LOG/native-configure.log" "$LOG/native-build.log"
  exit 1
fi
echo "== native/ built in $(($(date +%s) - t0)) s"

if [ -f .device/app/epa2a-tools.dll ]; then
  APP=.device/app
else
  APP=artifacts/gpu-check
  dotnet publish src/EpA2A.Tools -c Release -o "$APP" -v:q -nologo >"$LOG/publish.log" 2>&1 || { tail -30 "$LOG/publish.log"; exit 1; }
fi

export EPA2A_NATIVE_DIR=$PWD/native/build
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-3G}
start_mps
dotnet "$APP/epa2a-tools.dll" gpu-check --out "$LOG" "$@" 2>&1 | tee "$LOG/gpu-check.log"
rc=${PIPESTATUS[0]}
stop_mps >/dev/null 2>&1
exit "$rc"
