#!/usr/bin/env bash
# Issue 21 item 4: `tidemark update-img` against the disk's own limit for the same work.
#
#   bash benches/update-img.sh [SIZE_GIB] [RUNS]      (defaults: 4 GiB, 3 runs; needs root)
#
# A SIZE_GIB source image of random data and a target image that differs from it only in
# scattered 64 KiB blocks (1% and 10% of the image, random offsets, adjacent blocks merged
# into one extent). `tidemark update-img SRC CHANGED IMAGE` copies exactly those extents;
# the peer is fio replaying an iolog (version 2) generated from the same extent list: for
# each extent one read from SRC and one write of the same offset and length into IMAGE,
# io_uring, O_DIRECT, 32 in flight, then an fsync of IMAGE. Both are timed cold (page cache
# dropped before each step; the two programs and their libraries are read back in) up to
# durability (update-img fsyncs before it returns). Before
# every step the extents are overwritten in IMAGE with a pattern, so SRC and IMAGE differ in
# exactly those blocks (after fio's step, which writes its own data, IMAGE is made equal
# to SRC again, untimed); after the first update-img of each size, `tidemark verify`
# checks that IMAGE equals SRC. Runs are paired; medians of RUNS are printed with the load
# (uptime) of each step and the ratio update-img / fio (goal <= 1.2).
# Env: BENCH_DIR (default /var/tmp/tidemark-updimg), TIDEMARK_BIN (default
# target/release/tidemark), KEEP=1 keeps the files.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${1:-4}
RUNS=${2:-3}
DIR=${BENCH_DIR:-/var/tmp/tidemark-updimg}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
SIZE=$((SIZE_GIB << 30))

[ "$(id -u)" = 0 ] || { echo "run as root: cold runs drop the page cache" >&2; exit 2; }
mkdir -p "$DIR"
if [ "$(findmnt -n -o FSTYPE --target "$DIR")" = tmpfs ]; then
    echo "$DIR is on tmpfs; set BENCH_DIR to a directory on a real disk" >&2
    exit 2
fi
[ -x "$BIN" ] || cargo build --release -q -p tidemark
for tool in fio python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (bash scripts/install-deps.sh)" >&2; exit 2; }
done
cleanup() {
    [ -s "${RESULTS:-/nonexistent}" ] && [ "${DONE:-0}" = 0 ] && { echo "partial results:"; cat "$RESULTS"; }
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
need=$((2 * SIZE + (64 << 20)))
have=$(df --output=avail -B1 "$DIR" | tail -1)
for f in src.img image.img; do [ -f "$DIR/$f" ] && have=$((have + $(stat -c %s "$DIR/$f"))); done
if [ "$have" -lt "$need" ]; then
    echo "$DIR has $((have >> 20)) MiB free; the benchmark needs $((need >> 20)) MiB" >&2
    exit 2
fi

SRC=$DIR/src.img
IMAGE=$DIR/image.img
RESULTS=$DIR/results.txt
: >"$RESULTS"

echo "== setup: ${SIZE_GIB} GiB of random data in $DIR, $RUNS paired runs"
if [ ! -f "$SRC" ] || [ "$(stat -c %s "$SRC")" != "$SIZE" ]; then
    fio --name=fill --filename="$SRC" --rw=write --bs=1M --size="$SIZE" --direct=1 \
        --ioengine=io_uring --iodepth=8 --refill_buffers --randrepeat=0 --output=/dev/null
fi
[ -f "$IMAGE" ] && [ "$(stat -c %s "$IMAGE")" = "$SIZE" ] || cp "$SRC" "$IMAGE"

# The extent list (offset length, bytes) and fio's iolog of the same requests. update-img
# reads and writes an extent in one request up to its buffer size (the largest extent,
# at most 1 MiB), so the iolog splits extents the same way.
for pct in 1 10; do
    python3 - "$SIZE" "$pct" "$SRC" "$IMAGE" "$DIR/changed-$pct.txt" "$DIR/iolog-$pct" <<'PY'
import random, sys
size, pct, src, image, changed, iolog = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
block = 65536
random.seed(pct)
picked = sorted(random.sample(range(size // block), size // block * pct // 100))
extents = []
for b in picked:
    if extents and extents[-1][0] + extents[-1][1] == b * block:
        extents[-1][1] += block
    else:
        extents.append([b * block, block])
piece = min(max(length for _, length in extents), 1 << 20)
with open(changed, "w") as out:
    for offset, length in extents:
        print(offset, length, file=out)
with open(iolog, "w") as out:
    print("fio version 2 iolog", file=out)
    for f in (src, image):
        print(f, "add", file=out)
    for f in (src, image):
        print(f, "open", file=out)
    for offset, length in extents:
        for at in range(offset, offset + length, piece):
            n = min(piece, offset + length - at)
            print(src, "read", at, n, file=out)
            print(image, "write", at, n, file=out)
    print(image, "sync", 0, 0, file=out)
    for f in (src, image):
        print(f, "close", file=out)
print(f"{pct}%: {len(picked)} blocks of 64 KiB in {len(extents)} extents, "
      f"requests of up to {piece >> 10} KiB", file=sys.stderr)
PY
done

# Overwrite the changed extents in IMAGE with a pattern: SRC and IMAGE differ only there.
scramble() {
    python3 - "$IMAGE" "$DIR/changed-$1.txt" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
pattern = b"\x5a" * (1 << 20)
for line in open(sys.argv[2]):
    offset, length = map(int, line.split())
    os.pwrite(fd, pattern[:length], offset)
os.fsync(fd)
PY
}
# Cold means the data: after dropping the page cache, both tools' executables and shared
# libraries are read back in (fio links some 40 libraries; reading them from disk under
# load took seconds, more than fio's own I/O).
programs=("$BIN" "$(command -v fio)")
mapfile -t -O 2 programs < <(ldd "$(command -v fio)" "$BIN" | awk '$3 ~ /^\// { print $3 }' | sort -u)
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; cat "${programs[@]}" >/dev/null; }
load() { cut -d' ' -f1 /proc/loadavg; }

# time_step NAME PCT CMD...: scramble, drop caches, time CMD; record seconds and load.
time_step() {
    local name=$1 pct=$2; shift 2
    scramble "$pct"
    drop_caches
    local before start end
    before=$(load)
    start=$(date +%s%N)
    "$@" >"$DIR/stdout" 2>"$DIR/stderr" || { echo "$name failed:" >&2; cat "$DIR/stderr" >&2; exit 1; }
    end=$(date +%s%N)
    local secs
    secs=$(awk "BEGIN { print ($end - $start) / 1e9 }")
    echo "$name $pct $secs $before $(load)" >>"$RESULTS"
    printf '  %-10s %3s%%  %6.2f s  (load %s -> %s)\n' "$name" "$pct" "$secs" "$before" "$(load)"
}

fio_replay() {
    fio --name=replay --read_iolog="$DIR/iolog-$1" --ioengine=io_uring --iodepth=32 \
        --direct=1 --end_fsync=1 --output-format=json --output="$DIR/fio-$1.json"
}

for run in $(seq 1 "$RUNS"); do
    echo "== run $run/$RUNS"
    for pct in 1 10; do
        time_step update-img "$pct" "$BIN" update-img --json "$SRC" "$DIR/changed-$pct.txt" "$IMAGE"
        cp "$DIR/stdout" "$DIR/update-img-$pct-$run.json"
        if [ "$run" = 1 ]; then
            "$BIN" verify "$SRC" "$IMAGE" >/dev/null \
                || { echo "update-img left $IMAGE different from $SRC" >&2; exit 1; }
        fi
        time_step fio "$pct" fio_replay "$pct"
        cp "$DIR/fio-$pct.json" "$DIR/fio-$pct-$run.json"
        # fio wrote its own data: make IMAGE equal SRC again (untimed).
        "$BIN" update-img "$SRC" "$DIR/changed-$pct.txt" "$IMAGE" >/dev/null
    done
done

DONE=1
echo
python3 - "$RESULTS" "$DIR" <<'PY'
import json, statistics, sys
from collections import defaultdict
results, bench_dir = sys.argv[1], sys.argv[2]
times, loads = defaultdict(list), defaultdict(list)
for line in open(results):
    name, pct, secs, before, after = line.split()
    times[(name, pct)].append(float(secs))
    loads[pct] += [float(before), float(after)]
for pct in ("1", "10"):
    ours, fio = statistics.median(times[("update-img", pct)]), statistics.median(times[("fio", pct)])
    runs = len(times[("update-img", pct)])
    reports = [json.load(open(f"{bench_dir}/update-img-{pct}-{r}.json")) for r in range(1, runs + 1)]
    fio_jobs = [json.load(open(f"{bench_dir}/fio-{pct}-{r}.json"))["jobs"][0] for r in range(1, runs + 1)]
    report, job = reports[0], fio_jobs[0]
    # The I/O phase alone: update-img's own timing (open, lseeks, I/O, fsync) against
    # fio's job runtime (I/O and the fsync), without either program's start-up.
    ours_io = statistics.median(r["seconds"] for r in reports)
    fio_io = statistics.median(j["job_runtime"] / 1000 for j in fio_jobs)
    mib = (job["read"]["io_bytes"] + job["write"]["io_bytes"]) / (1 << 20)
    depths = ", ".join(f"{k}:{v:.0f}%" for k, v in job["iodepth_level"].items() if v >= 1)
    print(f"update-img, {pct}% changed in 64 KiB blocks, cold, fsync included "
          f"(median of {len(times[('update-img', pct)])}, load {min(loads[pct]):.1f}-{max(loads[pct]):.1f}):")
    print(f"  update-img {ours:6.2f} s  ({report['bytes_read'] >> 20} MiB read, "
          f"{report['bytes_copied'] >> 20} MiB written)")
    print(f"  fio        {fio:6.2f} s  ({mib:.0f} MiB read+written, {job['read']['total_ios']} reads, "
          f"{job['write']['total_ios']} writes, QD {depths})")
    print(f"  update-img / fio = {ours / fio:.2f}x (goal <= 1.20)")
    print(f"  I/O phase only (medians): update-img {ours_io:.3f} s, fio job {fio_io:.3f} s: "
          f"{ours_io / fio_io:.2f}x")
PY
