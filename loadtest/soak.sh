#!/usr/bin/env bash
# Fault soak: two switchboard instances on a private Redis under steady load, devices resuming
# by offset; during the run Redis is killed (SIGKILL) and restarted twice and one instance is
# killed with SIGKILL and restarted. Bounded (~DURATION + 30 s); everything it starts is
# stopped by pid. Exit: the generator's (0 clean; 1 a device lost a message without being told
# by `recovered` complete=false, or saw a duplicate; 2 could not run), or 2 on setup failure.
#
# Env: SWITCHBOARD (server binary), LOADTEST (generator binary), DURATION (s, default 60),
# USERS (50), DEVICES (2), RATE (200), BASE_PORT (first of three free ports, default 17380),
# OVERLAP=1 (also kill Redis 0.5 s before the instance, back 3 s later),
# APPENDFSYNC (Redis's appendfsync: `always`, the default, so that what Redis acknowledged
# survives its SIGKILL; `everysec` lets a killed Redis lose up to ~2 s of acknowledged writes),
# SOAK_JSON (copy the generator's JSON result there), SOAK_LOGS (copy server/redis logs to this dir).
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
: "${DURATION:=60}" "${USERS:=50}" "${DEVICES:=2}" "${RATE:=200}" "${BASE_PORT:=17380}"
: "${APPENDFSYNC:=always}"
if [ -z "${SWITCHBOARD:-}" ]; then
  for c in "$root/target/release/switchboard" /work/main/target/release/switchboard; do
    [ -x "$c" ] && SWITCHBOARD=$c && break
  done
fi
if [ -z "${LOADTEST:-}" ]; then
  for c in "${CARGO_TARGET_DIR:-$root/target}/release/loadtest" "$root/target/release/loadtest"; do
    [ -x "$c" ] && LOADTEST=$c && break
  done
fi
[ -x "${SWITCHBOARD:-}" ] || { echo "soak: no switchboard binary (set SWITCHBOARD)" >&2; exit 2; }
[ -x "${LOADTEST:-}" ] || { echo "soak: no loadtest binary (set LOADTEST)" >&2; exit 2; }

redis_port=$BASE_PORT
port_a=$((BASE_PORT + 1))
port_b=$((BASE_PORT + 2))
tmp=$(mktemp -d /tmp/soak.XXXXXX)
redis_pid="" a_pid="" b_pid="" lt_pid=""

cleanup() {
  # shellcheck disable=SC2086 # empty pids drop out
  stop_pids $lt_pid $a_pid $b_pid $redis_pid
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 2' INT TERM

log() { echo "soak $(date -u +%H:%M:%S) $*" >&2; }

start_redis() {
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$tmp" --save "" \
    --appendonly yes --appendfsync "$APPENDFSYNC" --daemonize no >>"$tmp/redis.log" 2>&1 &
  redis_pid=$!
  wait_port "$redis_port" 5 || { log "redis did not start"; exit 2; }
}

start_instance() { # port -> sets last_pid
  "$SWITCHBOARD" --listen "127.0.0.1:$1" --cores 1 --backplane redis \
    --redis-url "redis://127.0.0.1:$redis_port" --history on >>"$tmp/sb-$1.log" 2>&1 &
  last_pid=$!
  wait_port "$1" 5 || { log "instance on $1 did not start"; exit 2; }
}

for p in $redis_port $port_a $port_b; do
  if port_in_use "$p"; then
    echo "soak: port $p is in use (set BASE_PORT)" >&2
    exit 2
  fi
done

start_redis
log "redis pid $redis_pid on $redis_port"
start_instance "$port_a"; a_pid=$last_pid
start_instance "$port_b"; b_pid=$last_pid
log "instances pid $a_pid on $port_a, pid $b_pid on $port_b"

"$LOADTEST" soak --addr "127.0.0.1:$port_a" --addr "127.0.0.1:$port_b" \
  --users "$USERS" --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --drain 8 \
  --json >"$tmp/result.json" 2>"$tmp/loadtest.err" &
lt_pid=$!

# Faults, spread over the run (timings relative to the generator's start; it spends ~1-2 s
# connecting before the first message).
step=$((DURATION / 5))
[ "$step" -ge 4 ] || step=4
sleep "$step"
log "kill -9 redis ($redis_pid)"; kill -9 "$redis_pid"; wait "$redis_pid" 2>/dev/null
sleep 2; start_redis; log "redis restarted, pid $redis_pid"
sleep "$step"
if [ -n "${OVERLAP:-}" ]; then
  # Variant: the instance dies while Redis is down, so its devices resume with Redis away.
  log "kill -9 redis ($redis_pid)"; kill -9 "$redis_pid"; wait "$redis_pid" 2>/dev/null
  sleep 0.5
fi
log "kill -9 instance on $port_b ($b_pid)"; kill -9 "$b_pid"; wait "$b_pid" 2>/dev/null
if [ -n "${OVERLAP:-}" ]; then
  sleep 3; start_redis; log "redis restarted, pid $redis_pid"
fi
sleep 2; start_instance "$port_b"; b_pid=$last_pid; log "instance on $port_b restarted, pid $b_pid"
sleep "$step"
log "kill -9 redis ($redis_pid)"; kill -9 "$redis_pid"; wait "$redis_pid" 2>/dev/null
sleep 2; start_redis; log "redis restarted, pid $redis_pid"

# Bounded wait for the generator: duration + drain + connect slack.
wait_bounded "$lt_pid" $((DURATION + 40)); rc=$?
lt_pid=""
soak_report "$tmp" "$rc"
exit "$rc"
