#!/usr/bin/env bash
# Memory under churn: one fresh switchboard (`--cores 2`, history on, embedded unless
# BACKPLANE=redis) and `loadtest churn` against it for DURATION s: USERS x DEVICES connections
# held, CHURN of them closed (clean close, FIN, reset in turn) and reopened every second, RATE
# messages/s, the server's RSS, open fds and /healthz sampled every SAMPLE s.
# Bounded (DURATION + connect time + 90 s); everything it starts is stopped by pid. Memory is
# reported, never judged: exit 0 whatever the figures say, 2 on setup failure.
#
# Env: SWITCHBOARD (server binary), LOADTEST (generator binary), DURATION (s, default 600),
# USERS (4000), DEVICES (2), CHURN (closes/s, 200), RATE (messages/s, 20), FRESH (share of
# reopens as new users, 0), SAMPLE (s, 10), STEADY (s from which samples are the steady state,
# 60), PORT (default 18900; BACKPLANE=redis also takes
# PORT+1 for a private redis-server), BACKPLANE (embedded or redis), SERVER_ARGS (extra server
# flags), CHURN_JSON (copy the generator's JSON report there), CHURN_LOGS (copy logs to this dir).
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
: "${DURATION:=600}" "${USERS:=4000}" "${DEVICES:=2}" "${CHURN:=200}" "${RATE:=20}"
: "${FRESH:=0}" "${SAMPLE:=10}" "${STEADY:=60}" "${PORT:=18900}" "${BACKPLANE:=embedded}" "${SERVER_ARGS:=}"
find_binaries churn

tmp=$(mktemp -d /tmp/churn.XXXXXX)
redis_pid="" sb_pid="" lt_pid=""

cleanup() {
  # shellcheck disable=SC2086 # empty pids drop out
  stop_pids $lt_pid $sb_pid $redis_pid
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 2' INT TERM

log() { echo "churn $(date -u +%H:%M:%S) $*" >&2; }

ports=$PORT
[ "$BACKPLANE" = redis ] && ports="$PORT $((PORT + 1))"
for p in $ports; do
  if port_in_use "$p"; then
    echo "churn: port $p is in use (set PORT)" >&2
    exit 2
  fi
done

backplane_args=()
case "$BACKPLANE" in
  embedded) ;;
  redis)
    redis_port=$((PORT + 1))
    redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$tmp" --save "" \
      --appendonly no --daemonize no >"$tmp/redis.log" 2>&1 &
    redis_pid=$!
    wait_port "$redis_port" 5 || { log "redis did not start"; exit 2; }
    log "redis pid $redis_pid on $redis_port"
    backplane_args=(--backplane redis --redis-url "redis://127.0.0.1:$redis_port")
    ;;
  *) echo "churn: BACKPLANE must be embedded or redis" >&2; exit 2 ;;
esac

# shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
"$SWITCHBOARD" --listen "127.0.0.1:$PORT" --cores 2 "${backplane_args[@]}" $SERVER_ARGS \
  >"$tmp/switchboard.log" 2>&1 &
sb_pid=$!
wait_port "$PORT" 5 || { log "switchboard did not start"; cat "$tmp/switchboard.log" >&2; exit 2; }
log "switchboard pid $sb_pid on $PORT ($BACKPLANE): $SWITCHBOARD"

"$LOADTEST" churn --addr "127.0.0.1:$PORT" --users "$USERS" --devices "$DEVICES" \
  --churn-per-sec "$CHURN" --rate "$RATE" --fresh-users "$FRESH" --duration "$DURATION" \
  --sample-every "$SAMPLE" --steady-after "$STEADY" --server-pid "$sb_pid" --json >"$tmp/result.json" &
lt_pid=$!

# Bounded wait: the run, the initial connect, the final sample and slack.
wait_bounded "$lt_pid" $((${DURATION%.*} + 90)); rc=$?
lt_pid=""
if [ -n "${CHURN_JSON:-}" ]; then cp "$tmp/result.json" "$CHURN_JSON"; fi
if [ -n "${CHURN_LOGS:-}" ]; then mkdir -p "$CHURN_LOGS" && cp "$tmp"/*.log "$CHURN_LOGS/"; fi
n=$(grep -ciE 'error|warn' "$tmp/switchboard.log" || true)
log "switchboard.log: $n warning/error lines"
log "generator exit status $rc (1 = some connections failed or were dropped)"
[ "$rc" -le 1 ] || exit 2
exit 0
