#!/usr/bin/env bash
# The whole test suite: installs what the suite needs, then build, clippy, fmt, every
# test (unit, property, end-to-end against real NBD peers), and a short fuzz smoke run.
# Usage: bash scripts/test.sh        (the README's test command; .ci/run calls exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
start=$SECONDS
stage() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - start)); }

stage "system packages"
bash scripts/install-deps.sh

stage "build"
cargo build --workspace --all-targets --locked

stage "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

stage "rustfmt"
cargo fmt --all --check

stage "tests"
# The end-to-end tests run the release binary: its I/O paths are what users run.
cargo build --release --locked -p tidemark
TIDEMARK_BIN="$PWD/target/release/tidemark" cargo test --workspace --locked --no-fail-fast -- --test-threads=2

stage "fuzz smoke"
bash scripts/fuzz-smoke.sh

stage "done"
