#!/usr/bin/env bash
# Issue 17's rollback benchmark: `tidemark volume rollback` of a 1% change against a full
# `tidemark restore` of the same volume from the same point, side by side in one run.
#
#   bash benches/rollback.sh [SIZE_GIB] [RUNS]      (defaults: 4 GiB, 3 runs; needs root)
#
# Setup: a SIZE_GIB volume of random data (fio) under a `tidemark serve` of its own, and
# its point at checkpoint c1: a full backup at c0 pushed as an image (BASE=image, the
# default) or as a full delta (BASE=delta), then 64 MiB changed and the delta c0 -> c1.
# Each run: change 1% of the volume through its live NBD export (qemu-io, scattered
# 64 KiB writes), then drop the page cache and time the rollback to c1 (it reads only the
# changed blocks from the point and fdatasyncs), then drop the cache and time a full
# restore of the point into a new image (fsynced). Then the rolled back volume is compared
# with that restored image (cmp).
# BASE=delta shows the cost of a delta base: a delta stores data in checksummed records of
# up to 4 MiB, and a 64 KiB block is read by reading (and checking) its whole record.
# BASE=repo pushes c0 and c1 as points of a directory repository (repo:DIR) and compares
# `volume rollback --from repo:DIR v@c1` with `repo restore DIR v@c1`. Medians of RUNS,
# with the load (uptime) beside each run, and the ratio rollback / restore (the issue's
# goal: at most 0.05).
# Env: BENCH_DIR (default /var/tmp/tidemark-rollback-bench), TIDEMARK_BIN (default
# target/release/tidemark), KEEP=1 keeps the files.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${1:-4}
RUNS=${2:-3}
DIR=${BENCH_DIR:-/var/tmp/tidemark-rollback-bench}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
SIZE=$((SIZE_GIB << 30))
GRAIN=65536

[ "$(id -u)" = 0 ] || { echo "run as root: every run drops the page cache" >&2; exit 2; }
for tool in fio qemu-io cmp python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (bash scripts/install-deps.sh)" >&2; exit 2; }
done
[ -x "$BIN" ] || cargo build --release -q -p tidemark
mkdir -p "$DIR"
if [ "$(findmnt -n -o FSTYPE --target "$DIR")" = tmpfs ]; then
    echo "$DIR is on tmpfs; set BENCH_DIR to a directory on a real disk" >&2
    exit 2
fi
# The volume, its full backup and the restored image.
need=$((3 * SIZE + (512 << 20)))
avail=$(df --output=avail -B1 "$DIR" | tail -1)
if [ "$avail" -lt "$need" ]; then
    echo "$DIR has $((avail >> 20)) MiB free; the benchmark needs $((need >> 20)) MiB" >&2
    exit 2
fi

STATE=$DIR/state
VOL=$DIR/v.raw
BASE=${BASE:-image}
case "$BASE" in
    image) FULL=$DIR/c0.raw; FULL_FORMAT=image ;;
    delta) FULL=$DIR/c0.delta; FULL_FORMAT=delta ;;
    repo) FULL=$DIR/repo; FULL_FORMAT=repo ;;
    *) echo "BASE must be image, delta or repo" >&2; exit 2 ;;
esac
POINT=$DIR/c0-c1.delta
RESTORED=$DIR/restored.raw
SOCK=$STATE/nbd.sock
SERVE_PID=
cleanup() {
    [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
tm() { "$BIN" "$@" --state-dir "$STATE"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
load() { uptime | sed 's/.*load average: //'; }
# seconds CMD...: run CMD, print its wall time in seconds.
seconds() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    echo "$end - $start" | bc -l
}
median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

echo "== setup: a ${SIZE_GIB} GiB volume of random data in $DIR, $RUNS runs"
rm -rf "$STATE" "$VOL" "$FULL" "$POINT" "$RESTORED"
fio --name=fill --filename="$VOL" --rw=write --bs=1M --size="$SIZE" --direct=1 \
    --ioengine=psync --refill_buffers --randrepeat=0 --output=/dev/null
mkdir -m 700 -p "$STATE"
"$BIN" serve --state-dir "$STATE" 2>"$DIR/serve.log" &
SERVE_PID=$!
for _ in $(seq 100); do [ -S "$STATE/control.sock" ] && break; sleep 0.1; done
tm volume create v --backing "$VOL" >/dev/null
if [ "$BASE" = repo ]; then
    "$BIN" repo init "$FULL" >/dev/null
    tm backup begin v --checkpoint c0 --push "repo:$FULL" >/dev/null
    qemu-io -f raw -c "write -P 7 $((SIZE / 3)) 64M" "nbd+unix:///v?socket=$SOCK" >/dev/null
    tm backup begin v --incremental c0 --checkpoint c1 --push "repo:$FULL" >/dev/null
    echo "point at c1: repo:$FULL v@c1 ($(du -sh "$FULL" | cut -f1) in the repository)"
    FROM=("repo:$FULL" v@c1)
    RESTORE=(repo restore "$FULL" v@c1 --into "$RESTORED")
else
    tm backup begin v --checkpoint c0 --push "$FULL" --push-format "$FULL_FORMAT" >/dev/null
    qemu-io -f raw -c "write -P 7 $((SIZE / 3)) 64M" "nbd+unix:///v?socket=$SOCK" >/dev/null
    tm backup begin v --incremental c0 --checkpoint c1 --push "$POINT" --push-format delta >/dev/null
    echo "point at c1: $FULL ($FULL_FORMAT, $(du -h "$FULL" | cut -f1)) + $POINT ($(du -h "$POINT" | cut -f1))"
    FROM=("$FULL" "$POINT")
    RESTORE=(restore --into "$RESTORED" "$FULL" "$POINT")
fi

# 1% of the volume in scattered 64 KiB blocks, a new pattern each run.
change=$((SIZE / 100 / GRAIN))
qemu_changes() {
    python3 - "$1" "$change" "$((SIZE / GRAIN))" <<'EOF'
import random, sys
run, count, blocks = (int(a) for a in sys.argv[1:])
rng = random.Random(run)
for block in rng.sample(range(blocks), count):
    print("-c")
    print(f"write -P {run * 7 % 250 + 1} {block * 65536} 65536")
EOF
}

printf '%-4s %12s %12s %10s  %s\n' run rollback_s restore_s ratio "load (1/5/15 min)"
: >"$DIR/rollback.txt"
: >"$DIR/restore.txt"
for run in $(seq "$RUNS"); do
    mapfile -t args < <(qemu_changes "$run")
    qemu-io -f raw "${args[@]}" "nbd+unix:///v?socket=$SOCK" >/dev/null
    drop_caches
    rb=$(seconds tm volume rollback v --checkpoint c1 --from "${FROM[@]}")
    rm -f "$RESTORED"
    drop_caches
    rs=$(seconds "$BIN" "${RESTORE[@]}")
    cmp --silent "$VOL" "$RESTORED" || { echo "run $run: the rolled back volume differs from the point" >&2; exit 1; }
    echo "$rb" >>"$DIR/rollback.txt"
    echo "$rs" >>"$DIR/restore.txt"
    printf '%-4s %12.3f %12.3f %10.4f  %s\n' "$run" "$rb" "$rs" "$(echo "$rb / $rs" | bc -l)" "$(load)"
done
rb=$(median <"$DIR/rollback.txt")
rs=$(median <"$DIR/restore.txt")
ratio=$(echo "$rb / $rs" | bc -l)
printf 'median (%s base): rollback of a 1%% change %.3f s, full restore %.3f s: ratio %.4f (goal <= 0.05)\n' \
    "$BASE" "$rb" "$rs" "$ratio"
awk -v r="$ratio" 'BEGIN {exit !(r <= 0.05)}' || { echo "the rollback took more than 5% of a full restore" >&2; exit 1; }
