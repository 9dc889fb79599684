#!/usr/bin/env bash
# Failover soak on a Redis Cluster with replicas (issue 15): six private redis-servers
# (`--cluster-replicas 1`: three primaries, each with a replica; appendonly, appendfsync
# always), two switchboard instances with `--redis-cluster` and history on, and `loadtest soak`
# (acks, clientId resends, resume by offset) across both. At ~DURATION/3 one primary is
# SIGKILLed; its replica takes over after `--cluster-node-timeout` (NODE_TIMEOUT ms). The dead
# node is not restarted. Bounded; everything it starts is stopped by pid.
#
# Env: SWITCHBOARD, LOADTEST (binaries), DURATION (s, 45), USERS (50), DEVICES (2), RATE (200),
# BASE_PORT (first of eight ports, 17420; nodes use BASE_PORT..+5 and their bus port + 10000),
# NODE_TIMEOUT (2000), SERVER_ARGS (more switchboard arguments, e.g. "--redis-wait-replicas 1"),
# SOAK_JSON (copy the generator's JSON there), SOAK_LOGS (copy the logs).
# Needs redis-server and redis-cli 7 on PATH.
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
: "${DURATION:=45}" "${USERS:=50}" "${DEVICES:=2}" "${RATE:=200}" "${BASE_PORT:=17420}"
: "${NODE_TIMEOUT:=2000}"
SWITCHBOARD=${SWITCHBOARD:-$root/target/release/switchboard}
LOADTEST=${LOADTEST:-$root/target/release/loadtest}
[ -x "$SWITCHBOARD" ] || { echo "cluster_soak: no switchboard binary (set SWITCHBOARD)" >&2; exit 2; }
[ -x "$LOADTEST" ] || { echo "cluster_soak: no loadtest binary (set LOADTEST)" >&2; exit 2; }

tmp=$(mktemp -d /tmp/cluster-soak.XXXXXX)
node_pids=() a_pid="" b_pid="" lt_pid=""
cleanup() {
  # shellcheck disable=SC2086 # empty pids drop out
  stop_pids $lt_pid $a_pid $b_pid "${node_pids[@]}"
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 2' INT TERM
log() { echo "cluster_soak $(date -u +%H:%M:%S) $*" >&2; }

ports=() addrs=()
for i in 0 1 2 3 4 5; do
  p=$((BASE_PORT + i))
  if port_in_use "$p" || port_in_use $((p + 10000)); then
    echo "cluster_soak: port $p or $((p + 10000)) is in use (set BASE_PORT)" >&2
    exit 2
  fi
  ports+=("$p") addrs+=("127.0.0.1:$p")
done
port_a=$((BASE_PORT + 6)) port_b=$((BASE_PORT + 7))
for p in $port_a $port_b; do
  port_in_use "$p" && { echo "cluster_soak: port $p is in use (set BASE_PORT)" >&2; exit 2; }
done

for p in "${ports[@]}"; do
  mkdir -p "$tmp/$p"
  redis-server --port "$p" --bind 127.0.0.1 --dir "$tmp/$p" --save "" --appendonly yes \
    --appendfsync always --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout "$NODE_TIMEOUT" >>"$tmp/redis-$p.log" 2>&1 &
  node_pids+=($!)
  wait_port "$p" 5 || { log "redis on $p did not start"; exit 2; }
done
redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$tmp/create.log" 2>&1 ||
  { log "redis-cli --cluster create failed"; cat "$tmp/create.log" >&2; exit 2; }
for _ in $(seq 50); do
  redis-cli -p "${ports[0]}" CLUSTER INFO | grep -q cluster_state:ok && break
  sleep 0.2
done
seeds=$(IFS=,; echo "${addrs[*]}")
log "cluster: $(redis-cli -p "${ports[0]}" CLUSTER NODES | awk '{print $2, $3}' | tr '\n' ';')"

# shellcheck disable=SC2086 # SERVER_ARGS is a list
start_instance() { # port -> sets last_pid
  "$SWITCHBOARD" --listen "127.0.0.1:$1" --cores 1 --backplane redis --redis-cluster "$seeds" \
    --history on ${SERVER_ARGS:-} >>"$tmp/sb-$1.log" 2>&1 &
  last_pid=$!
  wait_port "$1" 5 || { log "instance on $1 did not start"; exit 2; }
}
start_instance "$port_a"; a_pid=$last_pid
start_instance "$port_b"; b_pid=$last_pid

"$LOADTEST" soak --addr "127.0.0.1:$port_a" --addr "127.0.0.1:$port_b" \
  --users "$USERS" --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --drain 8 \
  --json >"$tmp/result.json" 2>"$tmp/loadtest.err" &
lt_pid=$!

sleep $((DURATION / 3))
# The primary serving slot 0 (any primary would do).
victim=$(redis-cli -p "${ports[0]}" CLUSTER NODES | awk '$3 ~ /master/ && $9 ~ /^0-/ {print $2}' | cut -d@ -f1 | cut -d: -f2)
for i in "${!ports[@]}"; do
  if [ "${ports[$i]}" = "$victim" ]; then
    log "kill -9 primary on $victim (pid ${node_pids[$i]})"
    kill -9 "${node_pids[$i]}"
    wait "${node_pids[$i]}" 2>/dev/null
    node_pids[$i]=""
  fi
done
survivor=${ports[0]}
[ "$survivor" = "$victim" ] && survivor=${ports[1]}
for _ in $(seq 100); do
  redis-cli -p "$survivor" CLUSTER INFO | grep -q cluster_state:ok && break
  sleep 0.1
done
log "after failover: $(redis-cli -p "$survivor" CLUSTER NODES | awk '{print $2, $3}' | tr '\n' ';')"

wait_bounded "$lt_pid" $((DURATION + 40)); rc=$?
lt_pid=""
soak_report "$tmp" "$rc"
exit "$rc"
