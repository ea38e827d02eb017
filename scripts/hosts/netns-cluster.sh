#!/usr/bin/env bash
# Several hosts on one machine (root): network namespaces on a bridge, each with its own address.
#   scripts/hosts/netns-cluster.sh up      # Redis on 10.77.0.1, silos of ranks 0-3 on 10.77.0.10-13, a client namespace 10.77.0.100
#   scripts/hosts/netns-cluster.sh drive   # 20 checked steps from the client namespace
#   scripts/hosts/netns-cluster.sh cut 2   # pull rank 2's cable (its silo keeps running); `heal 2` plugs it back
#   scripts/hosts/netns-cluster.sh down    # stop everything, remove the namespaces
# EPA2A: the epa2a command (default: dotnet run --no-build --project src/EpA2A.Silo --).
set -euo pipefail
EPA2A=${EPA2A:-"dotnet run --no-build --project src/EpA2A.Silo --"}
NET=10.77.0
LOGS=${LOGS:-/tmp/epa2a-netns}
ns() { echo "epa2a-$1"; }

host() { # name address
  ip netns add "$(ns "$1")"
  ip link add "epa2a-p-$1" netns "$(ns br)" type veth peer name eth0 netns "$(ns "$1")"
  ip -n "$(ns br)" link set "epa2a-p-$1" master br0 up
  ip -n "$(ns "$1")" addr add "$2/24" dev eth0
  ip -n "$(ns "$1")" link set eth0 up
  ip -n "$(ns "$1")" link set lo up
}

case "${1:-}" in
  up)
    mkdir -p "$LOGS"
    ip netns add "$(ns br)"
    ip -n "$(ns br)" link add br0 type bridge
    ip -n "$(ns br)" link set br0 up
    host redis "$NET.1"
    for r in 0 1 2 3; do host "h$r" "$NET.1$r"; done
    host client "$NET.100"
    ip netns exec "$(ns redis)" redis-server --bind "$NET.1" --port 6379 --protected-mode no --save "" --appendonly no >"$LOGS/redis.log" 2>&1 &
    for r in 0 1 2 3; do
      # No --advertise: each silo advertises its own host's address (here 10.77.0.1r).
      ip netns exec "$(ns "h$r")" $EPA2A silo --rank "$r" --world-size 4 --group g --clustering redis --redis "$NET.1:6379" >"$LOGS/silo$r.log" 2>&1 &
    done
    echo "started; logs in $LOGS"
    ;;
  drive)
    ip netns exec "$(ns client)" $EPA2A drive --world-size 4 --group g --clustering redis --redis "$NET.1:6379" --steps "${2:-20}" --timeout-seconds 2 --continue-on-failure ${3:-}
    ;;
  cut) ip -n "$(ns br)" link set "epa2a-p-h$2" down ;;
  heal) ip -n "$(ns br)" link set "epa2a-p-h$2" up ;;
  down)
    for n in redis h0 h1 h2 h3 client br; do
      ip netns pids "$(ns $n)" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
      ip netns del "$(ns $n)" 2>/dev/null || true
    done
    ;;
  *) sed -n 2,8p "$0"; exit 2 ;;
esac
