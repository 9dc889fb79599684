#!/usr/bin/env bash
# Presence churn with Redis (issue 16, finding 4): a private redis-server (free port, temp dir),
# two release instances on it (`--cores 1` each, dev auth), then loadtest/presence_churn.js
# against both. Stops what it started, by pid.
# Usage: loadtest/presence_churn_redis.sh PRESENCE_INTERVAL CHURN(0|1) SECONDS
#   PRESENCE_INTERVAL 0 announces every change (as before coalescing with Redis), 1s the default.
# Needs redis-server, node and tests/socketio-client/node_modules (npm ci there).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/lib.sh"
interval=${1:?presence interval}
churn=${2:?0 or 1}
seconds=${3:-10}
switchboard=${SWITCHBOARD:-$root/target/release/switchboard}
[ -x "$switchboard" ] || { echo "no $switchboard: cargo build --release" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
pids=()
cleanup() { stop_pids "${pids[@]}"; rm -rf "$dir"; }
trap cleanup EXIT

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly no \
  --logfile "$dir/redis.log" &
pids+=($!)
wait_port "$redis_port" 10

ports=()
for i in 1 2; do
  port=$(free_port)
  "$switchboard" --listen "127.0.0.1:$port" --cores 1 --log-level error \
    --backplane redis --redis-url "redis://127.0.0.1:$redis_port" \
    --presence-interval "$interval" 2>"$dir/instance$i.log" &
  pids+=($!)
  wait_port "$port" 20
  ports+=("$port")
done

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
node "$root/loadtest/presence_churn.js" "${ports[0]},${ports[1]}" "$churn" "$seconds"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
