#!/usr/bin/env bash
# A short run of every fuzz target on its committed seed corpus (cargo-fuzz, nightly).
# The corpus is copied so a smoke run never grows the committed one.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-10}
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz smoke: FAILED: no nightly toolchain (cargo +nightly) on this machine" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
cargo +nightly fuzz build -O
for target in $(cargo +nightly fuzz list); do
    work=$(mktemp -d)
    if [ -d "corpus/$target" ]; then cp -r "corpus/$target/." "$work/"; fi
    echo "fuzz smoke: $target for ${seconds}s"
    cargo +nightly fuzz run -O "$target" "$work" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        >"$work.log" 2>&1 || { tail -40 "$work.log"; exit 1; }
    tail -1 "$work.log"
    rm -rf "$work" "$work.log"
done
