#!/usr/bin/env bash
# Runs every test of the workspace: unit, integration, doc tests, and each benchmark once.
#
# The integration tests start their own redis-server on free ports (never one already running),
# so redis-server must be on PATH, and the Socket.IO tests run the real socket.io-client, so
# Node.js (18 or later) and npm must be too. When one is missing, this script says so and stops;
# as root with apt-get, and with SWITCHBOARD_INSTALL_DEPS=1 or CI=true, it installs it instead.
# socket.io-client itself is installed with `npm ci` (from the committed lockfile) into
# tests/socketio-client/node_modules when that is missing, and `ws` for the JavaScript client's
# tests into clients/js/node_modules. The browser test also wants Debian's
# chromium (see below; .ci/run installs chromium).
#
# Usage: ./test.sh [extra arguments for cargo test, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")"

may_install() {
    [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 &&
        [[ "${SWITCHBOARD_INSTALL_DEPS:-}" == 1 || "${CI:-}" == true ]]
}

# require COMMAND DEBIAN-PACKAGE: installs the package when allowed, otherwise explains and exits.
require() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if may_install; then
        echo "test.sh: $cmd not found: installing $pkg with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
        command -v "$cmd" >/dev/null 2>&1 && return 0
        echo "test.sh: installed $pkg but $cmd is still not on PATH" >&2
        exit 1
    fi
    echo "test.sh: $cmd not found: install it (Debian/Ubuntu: apt-get install $pkg) and run again" >&2
    exit 1
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found: install the Rust toolchain (https://rustup.rs) and run again" >&2
    exit 1
fi
require redis-server redis-server
require redis-cli redis-tools
require node nodejs
require npm npm
if [[ ! -d tests/socketio-client/node_modules/socket.io-client ]]; then
    echo "test.sh: installing socket.io-client for the Socket.IO tests (npm ci in tests/socketio-client)"
    (cd tests/socketio-client && npm ci --no-audit --no-fund)
fi

# The JavaScript client's tests (tests/js_client.rs runs them) use `ws` as Node 20's WebSocket.
if [[ ! -d clients/js/node_modules/ws ]]; then
    echo "test.sh: installing ws for the JavaScript client's tests (npm ci in clients/js)"
    npm ci --prefix clients/js --no-audit --no-fund --loglevel=error
fi

# The browser test (tests/browser.rs) needs chromium, node and tests/browser/node_modules; without
# them it prints one line saying what is missing and passes (under CI=true it fails instead).
if [[ ! -d tests/browser/node_modules ]] && command -v npm >/dev/null 2>&1; then
    echo "test.sh: npm ci in tests/browser (playwright-core for the browser test)"
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error ||
        echo "test.sh: npm ci failed in tests/browser: the browser test will skip" >&2
fi

# --all-targets builds and runs lib, bin, integration-test and bench targets (criterion runs each
# benchmark once in test mode, so benches are checked, not measured); it skips doc tests, hence
# the second command. --no-fail-fast: one run reports every failing test binary.
status=0
set -x
cargo test --workspace --all-targets --no-fail-fast "$@" || status=$?
cargo test --workspace --doc "$@" || status=$?
exit "$status"
