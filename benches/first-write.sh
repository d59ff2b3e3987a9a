#!/usr/bin/env bash
# Issue 21 item 1: first writes under a snapshot against the disk's own limit, and a
# baseline build beside the current one in the same run.
#
#   bash benches/first-write.sh [RUNS]        (default 3; run under the bench lock:
#   flock /var/tmp/tidemark-bench.lock bash benches/first-write.sh)
#
# Runs the engine_write bench (benches/benches/engine_write.rs) with the modes `off`,
# `durable`, `snap-first` and `snap-rewrite` (MODES, default durable,snap-first) for the
# 4 KiB random (8 writers) and 1 MiB sequential (4 writers) patterns; snap-first runs
# under a durable checkpoint, so the bench also prints snap-first / durable, and the time
# `drop_snapshot` takes to delete the COW store. Each round the bench also runs fio on files beside its image at
# the pattern's request size and concurrency (O_DIRECT, same filesystem) and prints the
# copy-before-write limit 1/(W/R+2) (and, for 4 KiB random, the limit with store writes
# into fallocated extents and with free store writes) beside the measured snap-first
# ratio. Medians of RUNS rounds, the load after each round.
# Env: BASE_BENCH=PATH runs that engine_write binary (e.g. main's, built with
# `cargo bench -p tidemark-benches --bench engine_write --no-run` in a checkout of main
# and copied out) first, in the same run; TIDEMARK_BENCH_DIR (default /var/tmp) holds
# the images (a real disk, not tmpfs); PATTERNS (default 4k-random,1m-seq).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
command -v fio >/dev/null || { echo "missing fio (bash scripts/install-deps.sh)" >&2; exit 2; }
DIR=${TIDEMARK_BENCH_DIR:-/var/tmp}
if [ "$(findmnt -n -o FSTYPE --target "$DIR")" = tmpfs ]; then
    echo "$DIR is on tmpfs; set TIDEMARK_BENCH_DIR to a directory on a real disk" >&2
    exit 2
fi
built=$(cargo bench -p tidemark-benches --bench engine_write --locked --no-run 2>&1 |
    grep -o 'target/release/deps/engine_write-[0-9a-f]*' | tail -1)
[ -x "$built" ] || { echo "cannot find the engine_write bench binary" >&2; exit 2; }

run() {
    echo "== $1: $2 ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
    TIDEMARK_BENCH_RUNS=$RUNS TIDEMARK_BENCH_MODES=${MODES:-durable,snap-first} \
        TIDEMARK_BENCH_PATTERNS=${PATTERNS:-4k-random,1m-seq} "$2"
    echo
}
if [ -n "${BASE_BENCH:-}" ]; then
    run base "$BASE_BENCH"
fi
run current "$PWD/$built"
