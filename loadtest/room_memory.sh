#!/usr/bin/env bash
# How much does a room message cost Redis in memory (issue 15)? One instance with history on
# and a private redis-server; `loadtest room` joins MEMBERS users (one device each) to a room
# and sends MESSAGES messages of SIZE bytes to it; Redis's `used_memory` (INFO memory) before
# the run and after it, and the room stream's own size (MEMORY USAGE).
#
#   loadtest/room_memory.sh [SWITCHBOARD_BINARY]
#
# Environment: MEMBERS (300), MESSAGES (10), SIZE (60000), REDIS_PORT (16398), PORT (18303),
# SERVER_ARGS (more switchboard arguments). Never touches the Redis on 6379.
set -u
cd "$(dirname "$0")/.."
source loadtest/lib.sh

BIN=${1:-target/release/switchboard}
LOADTEST=${LOADTEST:-target/release/loadtest}
MEMBERS=${MEMBERS:-300}
MESSAGES=${MESSAGES:-10}
SIZE=${SIZE:-60000}
REDIS_PORT=${REDIS_PORT:-16398}
PORT=${PORT:-18303}

log() { echo "room_memory: $*" >&2; }

for p in "$REDIS_PORT" "$PORT"; do
  if port_in_use "$p"; then
    log "port $p is in use; pick others (REDIS_PORT, PORT)"
    exit 1
  fi
done

DIR=$(mktemp -d)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
  >/dev/null &
REDIS=$!
wait_port "$REDIS_PORT" 10 || { log "redis-server did not start"; stop_pids "$REDIS"; exit 1; }
# shellcheck disable=SC2086
"$BIN" --listen "127.0.0.1:$PORT" --cores 2 --backplane redis \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" --log-level warn ${SERVER_ARGS:-} &
SERVER=$!
wait_port "$PORT" 10 || { log "switchboard did not start"; stop_pids "$SERVER" "$REDIS"; exit 1; }

used() { redis-cli -p "$REDIS_PORT" INFO memory | tr -d '\r' | awk -F: '$1 == "used_memory" {print $2}'; }
before=$(used)
# One message per second: the run lasts MESSAGES seconds (plus the warm-up message).
"$LOADTEST" room --addr "127.0.0.1:$PORT" --users "$MEMBERS" --devices 1 --rate 1 \
  --duration "$MESSAGES" --drain 3 --size "$SIZE" --quiet
status=$?
after=$(used)
stream=$(redis-cli -p "$REDIS_PORT" --scan --pattern '{switchboard:r:*}:h' | head -1)
log "members $MEMBERS, messages $MESSAGES of $SIZE bytes (loadtest exit $status)"
log "used_memory before $before, after $after: grew by $((after - before)) bytes"
if [ -n "$stream" ]; then
  log "room stream $stream: XLEN $(redis-cli -p "$REDIS_PORT" XLEN "$stream"), MEMORY USAGE $(redis-cli -p "$REDIS_PORT" MEMORY USAGE "$stream") bytes"
fi
log "member streams (switchboard:h:*): $(redis-cli -p "$REDIS_PORT" --scan --pattern 'switchboard:h:*' | wc -l)"
stop_pids "$SERVER" "$REDIS"
rm -rf "$DIR"
exit "$status"
