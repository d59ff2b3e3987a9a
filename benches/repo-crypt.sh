#!/usr/bin/env bash
# The cost of repository encryption: full backup and restore into an encrypted directory
# repository against a plain one, in one run, side by side.
#
#   bash benches/repo-crypt.sh [SIZE_MIB]      (default 1024; needs root to drop caches)
#
# An image of SIZE_MIB (half random data, half zeros, alternating MiB) is served by
# `tidemark export` and stored with `tidemark pull --full --repo` into a new plain and a new
# encrypted repository (default 4 MiB chunks), then restored from each with `repo restore`;
# three rounds, alternating which goes first, the page cache dropped before every timed
# step. Each line is the median of three with the load average at the start of its first
# run; the ratio is encrypted throughput over plain.
# Env: BENCH_DIR (default /var/tmp/tidemark-crypt-bench), TIDEMARK_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
DIR=${BENCH_DIR:-/var/tmp/tidemark-crypt-bench}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
[ "$(id -u)" = 0 ] || { echo "run as root: timed steps drop the page cache" >&2; exit 2; }
[ -x "$BIN" ] || cargo build --release -q -p tidemark
. benches/repo-common.sh
repo_scratch
mbps() { python3 -c "print(f'{$1 / 1e6 / $2:.1f}')"; }
ratio() { python3 -c "print(f'{$2 / $1:.2f}x')"; }

IMG=$DIR/vm.raw
make_image "$IMG" "$SIZE_MIB"
BYTES=$((SIZE_MIB << 20))
"$BIN" export "$IMG" --read-only --socket "$DIR/nbd.sock" --name vm >"$DIR/export.log" 2>&1 & PIDS+=($!)
for _ in $(seq 300); do [ -S "$DIR/nbd.sock" ] && break; sleep 0.1; done
URI="nbd+unix:///vm?socket=$DIR/nbd.sock"
"$BIN" repo key generate "$DIR/repo.key" >/dev/null

declare -A BACKUP RESTORE LOAD_B LOAD_R
one() { # KIND ROUND
    local kind=$1 round=$2 repo=$DIR/repo-$1-$2 key=()
    [ "$kind" = encrypted ] && key=(--key "$DIR/repo.key")
    "$BIN" repo init "$repo" "${key[@]}" >/dev/null
    drop
    [ "$round" = 1 ] && LOAD_B[$kind]=$(load)
    local t0; t0=$(now)
    local repo_key=()
    [ "$kind" = encrypted ] && repo_key=(--repo-key "$DIR/repo.key")
    "$BIN" pull --full "$URI" --repo "$repo" "${repo_key[@]}" --volume vm \
        --volume-uuid 6f1c3e0a-8d9b-4c1e-9f57-2a8b7c6d5e4f --checkpoint c1 --json >/dev/null
    BACKUP[$kind]+=" $(python3 -c "print($(now) - $t0)")"
    drop
    [ "$round" = 1 ] && LOAD_R[$kind]=$(load)
    t0=$(now)
    "$BIN" repo restore "$repo" vm@c1 --into "$DIR/restored.raw" "${key[@]}" >/dev/null
    RESTORE[$kind]+=" $(python3 -c "print($(now) - $t0)")"
    cmp "$IMG" "$DIR/restored.raw"
    rm -rf "$repo" "$DIR/restored.raw"
}
for round in 1 2 3; do
    if [ $((round % 2)) = 1 ]; then one plain $round; one encrypted $round
    else one encrypted $round; one plain $round; fi
done
echo "repo-crypt: $SIZE_MIB MiB image, 4 MiB chunks, directory repositories under $DIR"
report() { # STEP PLAIN_TIMES ENCRYPTED_TIMES LOAD_PLAIN LOAD_ENCRYPTED
    local p e; p=$(median $2); e=$(median $3)
    printf '%-8s plain     %7s s %8s MB/s  (load %s)\n' "$1" "$p" "$(mbps $BYTES "$p")" "$4"
    printf '%-8s encrypted %7s s %8s MB/s  (load %s)  encrypted/plain %s\n' "$1" "$e" \
        "$(mbps $BYTES "$e")" "$5" "$(ratio "$e" "$p")"
}
report backup "${BACKUP[plain]}" "${BACKUP[encrypted]}" "${LOAD_B[plain]}" "${LOAD_B[encrypted]}"
report restore "${RESTORE[plain]}" "${RESTORE[encrypted]}" "${LOAD_R[plain]}" "${LOAD_R[encrypted]}"
