#!/usr/bin/env bash
# What does the production path cost in CPU per delivery (issue 14)? Two instances `--cores 1`
# with history on share a private redis-server; `loadtest direct` sends random direct messages
# (2 devices per user: 4 deliveries per message); the CPU time (/proc/PID/stat, utime + stime)
# of redis-server and of each instance over the run, divided by the messages and deliveries.
#
#   loadtest/redis_cpu.sh [SWITCHBOARD_BINARY]
#
# Environment: RATE (5000), DURATION (10), USERS (200), REDIS_PORT (16399), PORTS ("18301 18302"),
# SERVER_ARGS (more switchboard arguments, e.g. "--history off" for the pub/sub floor).
# Never touches the Redis on 6379. The box may be shared: say so next to any figure.
set -u
cd "$(dirname "$0")/.."
source loadtest/lib.sh

BIN=${1:-target/release/switchboard}
LOADTEST=${LOADTEST:-target/release/loadtest}
RATE=${RATE:-5000}
DURATION=${DURATION:-10}
USERS=${USERS:-200}
REDIS_PORT=${REDIS_PORT:-16399}
read -r -a PORTS <<<"${PORTS:-18301 18302}"

log() { echo "redis_cpu: $*" >&2; }

for p in "$REDIS_PORT" "${PORTS[@]}"; do
  if port_in_use "$p"; then
    log "port $p is in use; pick others (REDIS_PORT, PORTS)"
    exit 1
  fi
done

# ticks PID: utime + stime of PID, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

DIR=$(mktemp -d)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
  >/dev/null &
REDIS=$!
wait_port "$REDIS_PORT" 10 || { log "redis-server did not start"; stop_pids "$REDIS"; exit 1; }
PIDS=()
for p in "${PORTS[@]}"; do
  "$BIN" --listen "127.0.0.1:$p" --cores 1 --backplane redis \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" ${SERVER_ARGS:-} >"$DIR/server-$p.log" 2>&1 &
  PIDS+=($!)
done
for p in "${PORTS[@]}"; do
  wait_port "$p" 10 || { log "instance on $p did not start"; stop_pids "${PIDS[@]}" "$REDIS"; exit 1; }
done
sleep 1

ADDRS=()
for p in "${PORTS[@]}"; do ADDRS+=(--addr "127.0.0.1:$p"); done
R0=$(ticks "$REDIS")
S0=0
for pid in "${PIDS[@]}"; do S0=$((S0 + $(ticks "$pid"))); done
"$LOADTEST" direct "${ADDRS[@]}" --users "$USERS" --devices 2 --rate "$RATE" \
  --duration "$DURATION" --drain 2 >"$DIR/loadtest.out" 2>&1
STATUS=$?
R1=$(ticks "$REDIS")
S1=0
for pid in "${PIDS[@]}"; do S1=$((S1 + $(ticks "$pid"))); done
# Calls and Redis's own time per command (those run by scripts included).
redis-cli -p "$REDIS_PORT" INFO commandstats |
  grep -E "cmdstat_(evalsha|xadd|xtrim|pexpire|publish|get|set|time)[:]" >"$DIR/commandstats"
stop_pids "${PIDS[@]}" "$REDIS"

cat "$DIR/loadtest.out"
cat "$DIR/commandstats"
HZ=$(getconf CLK_TCK)
MESSAGES=$((RATE * DURATION))
awk -v r=$((R1 - R0)) -v s=$((S1 - S0)) -v hz="$HZ" -v m="$MESSAGES" 'BEGIN {
  printf "redis-server CPU: %.2f s = %.1f us/message, %.2f us/delivery\n", r / hz, r / hz * 1e6 / m, r / hz * 1e6 / m / 4
  printf "instances CPU:    %.2f s = %.1f us/message, %.2f us/delivery\n", s / hz, s / hz * 1e6 / m, s / hz * 1e6 / m / 4
  printf "total:            %.1f us/message, %.2f us/delivery (the loadtest client not counted)\n", (r + s) / hz * 1e6 / m, (r + s) / hz * 1e6 / m / 4
}'
rm -rf "$DIR"
exit "$STATUS"
