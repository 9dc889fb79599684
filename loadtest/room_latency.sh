#!/usr/bin/env bash
# Latency of one big room (issue 15), and who spends the CPU: `loadtest room` (MEMBERS users,
# one device each, member 0 sends RATE room messages/s for 10 s) against two instances on a
# private redis-server, or one embedded instance; prints the generator's result and each
# process's CPU (% of one CPU, from /proc/PID/stat, over 8 s of the sending phase).
#
#   loadtest/room_latency.sh MODE [SWITCHBOARD_BINARY]
#
# MODE: `on` (two instances, history on), `off` (two instances, --history off) or `embedded`.
# Environment: RATE (200), MEMBERS (1000), CORES (2), ARGS1 / ARGS2 (more arguments for the
# first / second instance, e.g. "--cores 1 --pin 0"; ARGS1 alone for embedded), REDIS_PORT
# (16411), PORT1 / PORT2 (18191 / 18192). Never touches the Redis on 6379.
set -u
cd "$(dirname "$0")/.."
source loadtest/lib.sh

MODE=${1:?usage: loadtest/room_latency.sh on|off|embedded [SWITCHBOARD_BINARY]}
BIN=${2:-target/release/switchboard}
LOADTEST=${LOADTEST:-target/release/loadtest}
RATE=${RATE:-200}
MEMBERS=${MEMBERS:-1000}
CORES=${CORES:-2}
ARGS1=${ARGS1:-}
ARGS2=${ARGS2:-}
REDIS_PORT=${REDIS_PORT:-16411}
PORT1=${PORT1:-18191}
PORT2=${PORT2:-18192}

log() { echo "room_latency: $*" >&2; }

for p in "$REDIS_PORT" "$PORT1" "$PORT2"; do
  if port_in_use "$p"; then
    log "port $p is in use; pick others (REDIS_PORT, PORT1, PORT2)"
    exit 1
  fi
done
tmp=$(mktemp -d)
pids=()
trap 'stop_pids "${pids[@]}"; rm -rf "$tmp"' EXIT

# shellcheck disable=SC2086 # ARGS1/ARGS2 are word lists
case "$MODE" in
  embedded)
    "$BIN" --listen "127.0.0.1:$PORT1" --cores "$CORES" $ARGS1 >"$tmp/s1.log" 2>&1 &
    pids+=($!)
    addrs=(--addr "127.0.0.1:$PORT1")
    ;;
  on | off)
    redis-server --port "$REDIS_PORT" --save "" --appendonly no --dir "$tmp" >"$tmp/redis.log" 2>&1 &
    pids+=($!)
    wait_port "$REDIS_PORT" 10 || { log "redis-server did not start"; exit 1; }
    history=()
    [ "$MODE" = off ] && history=(--history off)
    for i in 1 2; do
      port_var=PORT$i args_var=ARGS$i
      "$BIN" --listen "127.0.0.1:${!port_var}" --cores "$CORES" --backplane redis \
        --redis-url "redis://127.0.0.1:$REDIS_PORT" "${history[@]}" ${!args_var} \
        >"$tmp/s$i.log" 2>&1 &
      pids+=($!)
    done
    addrs=(--addr "127.0.0.1:$PORT1" --addr "127.0.0.1:$PORT2")
    ;;
  *) log "MODE is on, off or embedded"; exit 2 ;;
esac
for p in "$PORT1" $([ "$MODE" = embedded ] || echo "$PORT2"); do
  wait_port "$p" 10 || { log "no server on $p"; cat "$tmp"/s*.log >&2; exit 1; }
done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
"$LOADTEST" room "${addrs[@]}" --users "$MEMBERS" --devices 1 --rate "$RATE" --duration 10 \
  --drain 3 >"$tmp/out.txt" 2>&1 &
gen=$!
for _ in $(seq 1 600); do
  grep -q "sending" "$tmp/out.txt" && break
  sleep 0.1
done
watched=("${pids[@]}" "$gen")
declare -A before
for p in "${watched[@]}"; do before[$p]=$(cpu "$p"); done
sleep 8
line=""
for p in "${watched[@]}"; do
  line="$line $(ps -o comm= -p "$p" 2>/dev/null || echo gone) $(( ($(cpu "$p") - ${before[$p]}) * 100 / 800 ))%"
done
wait_bounded "$gen" 60
echo "room_latency $(date -u +%H:%M:%S) mode $MODE rate $RATE load $(cut -d' ' -f1 /proc/loadavg)"
echo "cpu over 8 s of sending:$line"
grep -E "deliveries|latency" "$tmp/out.txt"
