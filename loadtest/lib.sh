# Helpers shared by the run scripts (soak.sh, churn.sh, peers/cost.sh): source it, do not run it.

# stop_pids PID...: SIGTERM to each, half a second, then SIGKILL to any left. Only the pids
# given: a script stops what it started and nothing else.
stop_pids() {
  local p
  for p in "$@"; do
    kill "$p" 2>/dev/null
  done
  sleep 0.5
  for p in "$@"; do
    kill -9 "$p" 2>/dev/null
  done
}

# port_in_use PORT: whether something accepts connections on 127.0.0.1:PORT.
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_port PORT SECONDS: until something listens on 127.0.0.1:PORT; fails after SECONDS.
wait_port() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_in_use "$1" && return 0
    sleep 0.1
  done
  return 1
}

# wait_bounded PID SECONDS: waits for PID (a child of this shell) at most SECONDS, then kills it
# with SIGKILL (saying so through the script's `log`); returns its exit status.
wait_bounded() {
  local deadline=$((SECONDS + $2))
  while kill -0 "$1" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
  if kill -0 "$1" 2>/dev/null; then
    log "generator overran; killing it"
    kill -9 "$1"
  fi
  wait "$1"
}

# find_binaries NAME: sets SWITCHBOARD and LOADTEST to the release binaries (an existing value
# wins, then $CARGO_TARGET_DIR, then the checkout's target/); exits 2 naming NAME when one is
# missing. Needs $root, the checkout.
find_binaries() {
  local c
  for c in "${SWITCHBOARD:-}" "${CARGO_TARGET_DIR:-$root/target}/release/switchboard" \
    "$root/target/release/switchboard"; do
    [ -n "$c" ] && [ -x "$c" ] && SWITCHBOARD=$c && break
  done
  for c in "${LOADTEST:-}" "${CARGO_TARGET_DIR:-$root/target}/release/loadtest" \
    "$root/target/release/loadtest"; do
    [ -n "$c" ] && [ -x "$c" ] && LOADTEST=$c && break
  done
  [ -x "${SWITCHBOARD:-}" ] || { echo "$1: no switchboard binary (set SWITCHBOARD)" >&2; exit 2; }
  [ -x "${LOADTEST:-}" ] || { echo "$1: no loadtest binary (set LOADTEST)" >&2; exit 2; }
}

# soak_report DIR STATUS: after a soak (soak.sh, cluster_soak.sh), the generator's summary from
# DIR/loadtest.err (every tenth progress line), copies of the result (SOAK_JSON) and the logs
# (SOAK_LOGS), and each server log's count of warning/error lines, through the script's `log`.
soak_report() {
  local f n
  grep -v '^soak t=' "$1/loadtest.err" >&2
  grep '^soak t=' "$1/loadtest.err" | awk 'NR % 10 == 0' >&2
  if [ -n "${SOAK_JSON:-}" ]; then cp "$1/result.json" "$SOAK_JSON"; fi
  if [ -n "${SOAK_LOGS:-}" ]; then mkdir -p "$SOAK_LOGS" && cp "$1"/*.log "$1/loadtest.err" "$SOAK_LOGS/"; fi
  for f in "$1"/sb-*.log; do
    n=$(grep -ciE 'error|warn' "$f" || true)
    log "$(basename "$f"): $n warning/error lines"
  done
  log "generator exit status $2"
}
