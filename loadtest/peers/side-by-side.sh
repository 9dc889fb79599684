#!/usr/bin/env bash
# Side-by-side run: the original Node.js design (loadtest/peers/seed, WORKERS=2, own Redis)
# vs switchboard embedded (--cores 2) vs two switchboard instances on a Redis backplane,
# same generator, one after the other, each scenario on a fresh server (and fresh Redis).
# Results (JSON + human summaries) go to $OUT. Never touches a Redis on 6379.
#
#   LOADTEST=/path/to/loadtest SWITCHBOARD=/path/to/switchboard OUT=/tmp/sbs \
#       loadtest/peers/side-by-side.sh
#
# WARMUP=1: before each ramp, warm the fresh server up with `direct --rate $WARMUP_RATE
# --duration $WARMUP_SECONDS` (default 250 and 5; the same for every design: a just-started
# Node process is slow until V8 has optimised its hot paths).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LOADTEST=${LOADTEST:-$HERE/../../target/release/loadtest}
SWITCHBOARD=${SWITCHBOARD:-$HERE/../../target/release/switchboard}
OUT=${OUT:-/tmp/side-by-side}
NODE_PORT=${NODE_PORT:-3101}
NODE_REDIS=${NODE_REDIS:-16393}
SB_REDIS=${SB_REDIS:-16394}
SB1=${SB1:-18281}
SB2=${SB2:-18282}
RAMP_COMMON=(ramp --users 200 --devices 2 --step-duration 5 --drain 2 --p99-bound-ms 10
             --max-steps 10 --json)
RAMP=("${RAMP_COMMON[@]}" --start-rate 2500 --step 2500)
IDLE=(idle --users 4000 --devices 2 --json)
mkdir -p "$OUT"

PIDS=()
stop_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
    PIDS=()
}
trap stop_all EXIT
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
start_redis() {
    redis-server --port "$1" --save "" --appendonly no >"$OUT/redis-$1.log" 2>&1 &
    PIDS+=($!); wait_port "$1"
}
start_node() {   # prints nothing; sets NODE_PIDS (primary + workers)
    start_redis "$NODE_REDIS"
    (cd "$HERE/seed" && PORT=$NODE_PORT REDIS_PORT=$NODE_REDIS WORKERS=2 exec node server.js) \
        >"$OUT/node.log" 2>&1 &
    local primary=$!; PIDS+=("$primary")
    for _ in $(seq 100); do
        [ "$(grep -c 'listening on' "$OUT/node.log")" -ge 2 ] && break; sleep 0.1
    done
    # shellcheck disable=SC2207
    NODE_PIDS=("$primary" $(pgrep -P "$primary"))
    PIDS+=("${NODE_PIDS[@]:1}")
    sleep 1
}
start_embedded() {
    "$SWITCHBOARD" --listen 127.0.0.1:$SB1 --cores 2 >"$OUT/sb-embedded.log" 2>&1 &
    SB_PIDS=($!); PIDS+=($!); wait_port $SB1; sleep 0.5
}
start_backplane() {
    start_redis "$SB_REDIS"
    "$SWITCHBOARD" --listen 127.0.0.1:$SB1 --cores 2 --backplane redis \
        --redis-url redis://127.0.0.1:$SB_REDIS >"$OUT/sb-redis-1.log" 2>&1 &
    SB_PIDS=($!); PIDS+=($!)
    "$SWITCHBOARD" --listen 127.0.0.1:$SB2 --cores 2 --backplane redis \
        --redis-url redis://127.0.0.1:$SB_REDIS >"$OUT/sb-redis-2.log" 2>&1 &
    SB_PIDS+=($!); PIDS+=($!)
    wait_port $SB1; wait_port $SB2; sleep 0.5
}
run() {  # name, loadtest args...
    local name=$1; shift
    { date -u; uptime; } >"$OUT/$name.uptime"
    echo "== $name: loadtest $*" >&2
    "$LOADTEST" "$@" >"$OUT/$name.json" 2>"$OUT/$name.txt" || true
    uptime >>"$OUT/$name.uptime"
    tail -n 3 "$OUT/$name.txt" >&2
}
warm() {  # same address flags as the ramp that follows
    if [ "${WARMUP:-0}" = 1 ]; then
        "$LOADTEST" direct --users 200 --devices 2 --rate "${WARMUP_RATE:-250}" \
            --duration "${WARMUP_SECONDS:-5}" --drain 1 --quiet "$@" \
            >"$OUT/warmup.log" 2>&1 || true
    fi
}
pid_flags() { for p in "$@"; do printf -- '--server-pid %s ' "$p"; done; }

start_node
warm --protocol socketio --addr 127.0.0.1:$NODE_PORT
run node-ramp "${RAMP[@]}" --protocol socketio --addr 127.0.0.1:$NODE_PORT
stop_all; start_node
# shellcheck disable=SC2046
run node-idle "${IDLE[@]}" --protocol socketio --addr 127.0.0.1:$NODE_PORT $(pid_flags "${NODE_PIDS[@]}")
stop_all; start_node
warm --protocol socketio --addr 127.0.0.1:$NODE_PORT
# Finer steps below the common ramp's first step (2,500 msg/s), where the Node design tops out.
run node-ramp-fine "${RAMP_COMMON[@]}" --start-rate 250 --step 250 --protocol socketio --addr 127.0.0.1:$NODE_PORT
stop_all

start_embedded
warm --addr 127.0.0.1:$SB1
run embedded-ramp "${RAMP[@]}" --addr 127.0.0.1:$SB1
stop_all; start_embedded
# shellcheck disable=SC2046
run embedded-idle "${IDLE[@]}" --addr 127.0.0.1:$SB1 $(pid_flags "${SB_PIDS[@]}")
stop_all

start_backplane
warm --addr 127.0.0.1:$SB1 --addr 127.0.0.1:$SB2
run redis2-ramp "${RAMP[@]}" --addr 127.0.0.1:$SB1 --addr 127.0.0.1:$SB2
stop_all; start_backplane
# shellcheck disable=SC2046
run redis2-idle "${IDLE[@]}" --addr 127.0.0.1:$SB1 --addr 127.0.0.1:$SB2 $(pid_flags "${SB_PIDS[@]}")
stop_all
echo "results in $OUT" >&2
