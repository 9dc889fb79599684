#!/usr/bin/env bash
# Bounded fuzzing of every target: FUZZ_SECONDS each (default 60), starting from the committed
# seed corpus. Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain (or
# RUSTC_BOOTSTRAP=1 on stable, which this script falls back to). New findings land in
# fuzz/artifacts/<target>/; turn each into a regression test before fixing it.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-60}
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
for target in http_request envelope connection backplane_wire socketio_packet; do
    echo "==> fuzzing $target for ${seconds}s"
    mkdir -p "corpus/$target"
    "${fuzz[@]}" run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
