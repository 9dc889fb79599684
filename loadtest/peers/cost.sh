#!/usr/bin/env bash
# CPU per delivery: the same `loadtest direct` load against each server design, one after the
# other, each on fresh servers and a fresh private Redis, with every server pid and the Redis
# pid handed to the generator (--server-pid, --redis-pid), which samples their CPU time
# (/proc/PID/stat utime+stime) at the start and end of the send window. Prints one markdown
# table row per setup; JSON reports and logs stay in $OUT. Never touches a Redis on 6379;
# everything it starts is stopped by pid.
#
#   loadtest/peers/cost.sh                       # all four setups, 5,000 messages/s for 10 s
#   RATE=1000 DURATION=3 loadtest/peers/cost.sh  # a short smoke run
#   SETUPS="embedded node" loadtest/peers/cost.sh
#
# Setups (SETUPS, default all four, in this order):
#   embedded          switchboard --cores 2
#   redis2            two switchboard --cores 1 --backplane redis, one Redis, history on (default)
#   redis2-nohistory  the same with --history off
#   node              the original Node.js design (loadtest/peers/seed: cluster of WORKERS=2,
#                     socket.io, Redis pub/sub), driven with --protocol socketio; counts the
#                     primary and both workers
#
# Env: RATE (messages/s, 5000), DURATION (s of sending, 10), DRAIN (s, 2), USERS (200),
# DEVICES (2), SENDERS (50), SWITCHBOARD / LOADTEST (binaries; default target/release),
# PORT (first of four consecutive ports: PORT, PORT+1 switchboard, PORT+2 Redis, PORT+3 Node;
# default 18310), OUT (results directory; default a new /tmp/cost.XXXXXX), SERVER_ARGS (extra
# switchboard flags, e.g. --rate-limit 0: needed only if one connection sends more than 200
# messages/s, i.e. RATE > 100 x SENDERS x DEVICES; and --sender-bytes-per-minute 0 once a
# sending user stores more than 8 MiB a minute for others, about RATE > 300 x SENDERS with the
# default message size), LOADTEST_ARGS (extra generator flags),
# RAMP=1 (run `ramp` instead: --start-rate RATE/5 --step RATE/5 --step-duration DURATION
# --max-steps 5 --p99-bound-ms 10; one row per step), CPU2 (start the second `--cores 1`
# instance under `taskset -c CPU2`, see below), PERF=1 (count the syscalls and context
# switches of the servers and Redis with `perf stat` over the generator's run, connects
# included; per delivery in $OUT/perf.txt and on stderr).
#
# Nothing is pinned by this script, but switchboard (`--pin auto`, the default) pins core k to
# the k-th CPU of its affinity mask, so the two `--cores 1` instances both run their core loop
# on the first CPU (measured cheaper than letting them float: SERVER_ARGS="--pin off"). CPU2=1
# moves the second instance (all its threads) to CPU 1.
# Exit 0 if every setup ran (whatever its figures), 2 on a setup failure.
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../lib.sh
. "$root/loadtest/lib.sh"
: "${RATE:=5000}" "${DURATION:=10}" "${DRAIN:=2}" "${USERS:=200}" "${DEVICES:=2}" "${SENDERS:=50}"
: "${PORT:=18310}" "${SERVER_ARGS:=}" "${LOADTEST_ARGS:=}" "${RAMP:=0}" "${PERF:=0}"
: "${SETUPS:=embedded redis2 redis2-nohistory node}"
find_binaries cost
command -v jq >/dev/null || { echo "cost: needs jq" >&2; exit 2; }
[ "$PERF" != 1 ] || command -v perf >/dev/null || { echo "cost: PERF=1 needs perf (linux-perf)" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/cost.XXXXXX)}
mkdir -p "$OUT"
SB1=$PORT SB2=$((PORT + 1)) REDIS_PORT=$((PORT + 2)) NODE_PORT=$((PORT + 3))

log() { echo "cost $(date -u +%H:%M:%S) $*" >&2; }

started=() # every server pid this script started, stopped by pid
lt_pid=""  # the generator while it runs
stop_all() {
  if [ ${#started[@]} -gt 0 ]; then
    stop_pids "${started[@]}"
    local p i
    for p in "${started[@]}"; do
      for ((i = 0; i < 100; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
  fi
  started=()
}
trap 'stop_pids $lt_pid; stop_all' EXIT
trap 'exit 2' INT TERM
fail() {
  log "$*"
  exit 2
}

for p in $SB1 $SB2 $REDIS_PORT $NODE_PORT; do
  port_in_use "$p" && fail "port $p is in use (set PORT)"
done

server_pids=() redis_pid=""
start_redis() {
  redis-server --port "$REDIS_PORT" --save "" --appendonly no >"$OUT/$1-redis.log" 2>&1 &
  redis_pid=$!
  started+=("$redis_pid")
  wait_port "$REDIS_PORT" 10 || fail "redis-server on $REDIS_PORT did not start (see $OUT/$1-redis.log)"
}
wrap=() # a command to start the next switchboard under (taskset), or nothing
start_switchboard() { # name, port, flags...
  local name=$1 port=$2
  shift 2
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
  "${wrap[@]}" "$SWITCHBOARD" --listen "127.0.0.1:$port" "$@" $SERVER_ARGS >"$OUT/$name-$port.log" 2>&1 &
  server_pids+=($!)
  started+=($!)
  wait_port "$port" 15 || fail "switchboard on $port did not start (see $OUT/$name-$port.log)"
}
start_node() {
  if [ ! -d "$here/seed/node_modules" ]; then
    log "npm ci in $here/seed"
    (cd "$here/seed" && npm ci --no-audit --no-fund) >"$OUT/npm-ci.log" 2>&1 ||
      fail "npm ci failed (see $OUT/npm-ci.log)"
  fi
  start_redis node
  (cd "$here/seed" && PORT=$NODE_PORT REDIS_PORT=$REDIS_PORT WORKERS=2 exec node server.js) \
    >"$OUT/node.log" 2>&1 &
  local primary=$! i
  started+=("$primary")
  for ((i = 0; i < 300; i++)); do
    [ "$(grep -c 'listening on' "$OUT/node.log")" -ge 2 ] && break
    sleep 0.1
  done
  [ "$(grep -c 'listening on' "$OUT/node.log")" -ge 2 ] || fail "node server.js did not start (see $OUT/node.log)"
  # shellcheck disable=SC2207 # pids are words
  server_pids=("$primary" $(pgrep -P "$primary"))
  started+=("${server_pids[@]:1}")
  [ ${#server_pids[@]} -eq 3 ] || fail "expected the node primary and 2 workers, got pids ${server_pids[*]}"
}

# start SETUP: fresh servers (and Redis); sets server_pids, redis_pid and addr_args.
start() {
  server_pids=() redis_pid="" addr_args=()
  case "$1" in
    embedded)
      start_switchboard "$1" "$SB1" --cores 2
      addr_args=(--addr "127.0.0.1:$SB1")
      ;;
    redis2 | redis2-nohistory)
      local history=on
      [ "$1" = redis2-nohistory ] && history=off
      start_redis "$1"
      start_switchboard "$1" "$SB1" --cores 1 --backplane redis \
        --redis-url "redis://127.0.0.1:$REDIS_PORT" --history "$history"
      [ -n "${CPU2:-}" ] && wrap=(taskset -c "$CPU2")
      start_switchboard "$1" "$SB2" --cores 1 --backplane redis \
        --redis-url "redis://127.0.0.1:$REDIS_PORT" --history "$history"
      wrap=()
      addr_args=(--addr "127.0.0.1:$SB1" --addr "127.0.0.1:$SB2")
      ;;
    node)
      start_node
      addr_args=(--protocol socketio --addr "127.0.0.1:$NODE_PORT")
      ;;
    *) fail "unknown setup $1 (SETUPS: embedded redis2 redis2-nohistory node)" ;;
  esac
  sleep 1 # let the servers settle (the Node workers, the backplane subscriptions)
}

label() {
  case "$1" in
    embedded) echo "switchboard embedded, \`--cores 2\`" ;;
    redis2) echo "switchboard, 2 instances \`--cores 1\`, one Redis, history on" ;;
    redis2-nohistory) echo "switchboard, 2 instances \`--cores 1\`, one Redis, \`--history off\`" ;;
    node) echo "Node.js design (cluster ×2, socket.io, Redis pub/sub)" ;;
  esac
}

# row SETUP JSON: one markdown row per phase of the generator's JSON report.
row() {
  jq -r --arg setup "$(label "$1")" '
    def r(n): if . == null then "?" else (. * pow(10; n) | round / pow(10; n) | tostring) end;
    .phases[] |
    "| \($setup) | \(.sent / .duration_s | r(0)) | \(.deliveries_per_s | r(0)) | \(.server_cpu.cpu_us_per_delivery | r(1)) µs | \(if ([.server_cpu.processes[]? | select(.role == "redis")] | length) == 0 then "–" else (.server_cpu.redis_cpu_us_per_delivery | r(1)) + " µs" end) | \(.latency.p50_ms | r(2)) ms | \(.latency.p99_ms | r(2)) ms | \(.missing) / \(.duplicated) |"
  ' "$2"
}

if [ "$RAMP" = 1 ]; then
  step=$(awk -v r="$RATE" 'BEGIN { print r / 5 }')
  load=(ramp --start-rate "$step" --step "$step" --step-duration "$DURATION" --max-steps 5
    --p99-bound-ms 10)
else
  load=(direct --rate "$RATE" --duration "$DURATION")
fi
load+=(--users "$USERS" --devices "$DEVICES" --senders "$SENDERS" --drain "$DRAIN" --json)

rows=()
for setup in $SETUPS; do
  start "$setup"
  pid_args=()
  for p in "${server_pids[@]}"; do pid_args+=(--server-pid "$p"); done
  [ -n "$redis_pid" ] && pid_args+=(--redis-pid "$redis_pid")
  log "$setup: loadtest ${load[*]} ${addr_args[*]} ${pid_args[*]} $LOADTEST_ARGS"
  { date -u; uptime; } >"$OUT/$setup.uptime"
  # shellcheck disable=SC2086 # LOADTEST_ARGS is a list of flags
  "$LOADTEST" "${load[@]}" "${addr_args[@]}" "${pid_args[@]}" $LOADTEST_ARGS \
    >"$OUT/$setup.json" 2>"$OUT/$setup.txt" &
  lt_pid=$!
  perf_pid=""
  if [ "$PERF" = 1 ]; then
    # Syscalls and context switches of every server process and Redis for the generator's
    # whole run (connects and drain included), in $OUT/$setup.perf.
    all=("${server_pids[@]}")
    [ -n "$redis_pid" ] && all+=("$redis_pid")
    perf stat -e raw_syscalls:sys_enter,context-switches -p "$(IFS=,; echo "${all[*]}")" \
      -o "$OUT/$setup.perf" &
    perf_pid=$!
  fi
  # Bounded: connect, every step's sending and drain, and a minute of slack.
  wait_bounded "$lt_pid" $((60 + 6 * (${DURATION%.*} + ${DRAIN%.*} + 1)))
  status=$?
  lt_pid=""
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null
    wait "$perf_pid" 2>/dev/null
    deliveries=$(jq '[.phases[].delivered] | add' "$OUT/$setup.json")
    awk -v d="$deliveries" -v s="$setup" '/raw_syscalls:sys_enter|context-switches/ {
        gsub(",", "", $1); printf "%s: %s %s (%.2f per delivery)\n", s, $1, $2, $1 / d }' \
      "$OUT/$setup.perf" | tee -a "$OUT/perf.txt" >&2
  fi
  uptime >>"$OUT/$setup.uptime"
  stop_all
  [ "$status" -le 1 ] || fail "$setup: the generator could not run (exit $status; see $OUT/$setup.txt)"
  grep -E "server CPU|verdict" "$OUT/$setup.txt" >&2
  mapfile -t r < <(row "$setup" "$OUT/$setup.json")
  [ ${#r[@]} -gt 0 ] || fail "$setup: no phase in $OUT/$setup.json"
  rows+=("${r[@]}")
done

echo "| setup | messages/s | deliveries/s | CPU per delivery (servers + Redis) | of which Redis | p50 | p99 | lost / duplicated |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
log "JSON reports, generator summaries and server logs in $OUT"
