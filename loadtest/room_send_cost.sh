#!/usr/bin/env bash
# What does one room message cost Redis (issue 15)? The rooms worker's SEND script of each git
# revision given (default: HEAD), run N times from one client (redis-benchmark) for a room of
# MEMBERS members on a private redis-server; prints redis-benchmark's rate and Redis's own
# usec_per_call (INFO commandstats), which is the Redis CPU per room message.
#
#   loadtest/room_send_cost.sh [REV...]      e.g. loadtest/room_send_cost.sh 517e53e HEAD
#
# Environment: MEMBERS (1000), N (2000), REDIS_PORT (16412). Never touches the Redis on 6379.
set -u
cd "$(dirname "$0")/.."
source loadtest/lib.sh
MEMBERS=${MEMBERS:-1000}
N=${N:-2000}
P=${REDIS_PORT:-16412}
[ $# -gt 0 ] || set -- HEAD
port_in_use "$P" && { echo "room_send_cost: port $P is in use (REDIS_PORT)" >&2; exit 1; }
DIR=$(mktemp -d)
redis-server --port "$P" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >/dev/null &
R=$!
wait_port "$P" 10 || { stop_pids "$R"; exit 1; }
# The members under both layouts' names: `sb:rm:ROOM` before the per-slot keys,
# `{sb:r:ROOM}:m` since (each revision's script reads its own).
members() {
  for key in sb:rm:bench '{sb:r:bench}:m'; do
    seq 0 $((MEMBERS - 1)) | sed 's/^/u/' | xargs redis-cli -p "$P" SADD "$key" >/dev/null
  done
}
members
FRAME='{"event":"newMessage","args":{"id":"0123456789abcdef0000000000000001","from":"u0","room":"bench","text":"hello","ts":1764486000000}}'
for rev in "$@"; do
  # The script moved to rooms_worker/scripts.rs with the per-slot keys.
  script=$({ git show "$rev:src/backplane/rooms_worker/scripts.rs" 2>/dev/null ||
    git show "$rev:src/backplane/rooms_worker.rs"; } |
    python3 -c 'import re,sys; print(re.search(r"const SEND: &str = r#\"(.*?)\"#;", sys.stdin.read(), re.S).group(1))')
  sha=$(redis-cli -p "$P" SCRIPT LOAD "$script")
  redis-cli -p "$P" CONFIG RESETSTAT >/dev/null
  # ARGV: prefix, node, room, sender, frame, history on, max len, max age, no clientId, dedupe
  # window, max bytes (the per-member script ignores it), publish command (older scripts
  # ignore it: they always PUBLISH).
  rate=$(redis-benchmark -p "$P" -n "$N" -c 1 -q EVALSHA "$sha" 0 sb 0000000000000001 bench u0 \
    "$FRAME" 1 1000 86400000 "" 300000 16777216 PUBLISH | tr '\r' '\n' | tail -1 | sed 's/.*: //')
  echo "$rev: $rate; $(redis-cli -p "$P" INFO commandstats | grep cmdstat_evalsha)"
  redis-cli -p "$P" FLUSHALL >/dev/null
  members
done
stop_pids "$R"
rm -rf "$DIR"
