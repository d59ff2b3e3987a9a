#!/usr/bin/env bash
# Issue 5's benchmark: tidemark's copy engine side by side with its peers, in one run.
#
#   bash benches/copy-peers.sh [SIZE_GIB] [RUNS]      (defaults: 4 GiB, 3 runs; needs root)
#
# Full copy of a SIZE_GIB random-content file on the main disk, cold (caches dropped
# before every run) and page-cached (source read once beforehand): `tidemark copy` against
# dd bs=1M (buffered, and iflag=direct oflag=direct), cp, qemu-img convert -t none -T none
# -m 8 -W, nbdcopy, and fio with a concurrent O_DIRECT read job and write job (the disk's
# copy limit). Then update-img with 1% and 10% of the volume changed in scattered 64 KiB
# extents against a synchronous 4 KiB pread/pwrite loop (dattobd's method), cold.
# Every measurement includes making the destination durable (fsync / conv=fsync / sync FILE).
# Runs are paired (each run times every tool once, in order); medians are printed, with
# ratios of tidemark to each peer. Env: BENCH_DIR (default /var/tmp/tidemark-bench),
# TIDEMARK_BIN (default target/release/tidemark), KEEP=1 keeps the files.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${1:-4}
RUNS=${2:-3}
DIR=${BENCH_DIR:-/var/tmp/tidemark-bench}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
SIZE=$((SIZE_GIB << 30))

[ "$(id -u)" = 0 ] || { echo "run as root: cold runs drop the page cache" >&2; exit 2; }
mkdir -p "$DIR"
fstype=$(findmnt -n -o FSTYPE --target "$DIR")
if [ "$fstype" = tmpfs ]; then
    echo "$DIR is on tmpfs; set BENCH_DIR to a directory on a real disk" >&2
    exit 2
fi
[ -x "$BIN" ] || cargo build --release -q -p tidemark
for tool in dd cp qemu-img nbdcopy fio python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (bash scripts/install-deps.sh)" >&2; exit 2; }
done
cleanup() {
    # On a failure, show what was measured before it.
    [ -s "${RESULTS:-/nonexistent}" ] && [ "${DONE:-0}" = 0 ] && { echo "partial results:"; cat "$RESULTS"; }
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
    [ -n "${HUGE_BEFORE:-}" ] && echo "$HUGE_BEFORE" >/proc/sys/vm/nr_hugepages
}
trap cleanup EXIT
# fio-limit's buffers in hugetlb pages, as tidemark's pool is in transparent huge pages: on
# a virtio disk without indirect descriptors a 1 MiB buffer in 4 KiB pages fills the whole
# virtqueue (see benches/bench-vs-fio.sh), and small pages would understate the disk's limit.
HUGE_BEFORE=$(cat /proc/sys/vm/nr_hugepages)
FIO_MEMORY=(--iomem=shmhuge)
if ! echo $((HUGE_BEFORE + 40)) >/proc/sys/vm/nr_hugepages 2>/dev/null \
    || (($(awk '/HugePages_Free/ {print $2}' /proc/meminfo) < 40)); then
    echo "note: no hugetlb pages for fio-limit; it uses 4 KiB pages" >&2
    FIO_MEMORY=()
fi
# The source and one destination at a time (the update-img image replaces the copy).
need=$((2 * SIZE + (256 << 20)))
avail=$(($(df --output=avail -B1 "$DIR" | tail -1) + $( [ -f "$DIR/src.img" ] && stat -c %s "$DIR/src.img" || echo 0)))
if [ "$avail" -lt "$need" ]; then
    echo "$DIR has $((avail >> 20)) MiB free; the benchmark needs $((need >> 20)) MiB" >&2
    exit 2
fi

SRC=$DIR/src.img
DST=$DIR/dst.img
RESULTS=$DIR/results.txt
: >"$RESULTS"

echo "== setup: ${SIZE_GIB} GiB of random data in $DIR ($fstype), $RUNS paired runs"
if [ ! -f "$SRC" ] || [ "$(stat -c %s "$SRC")" != "$SIZE" ]; then
    # A fast userspace generator: fio writes incompressible random buffers.
    fio --name=fill --filename="$SRC" --rw=write --bs=1M --size="$SIZE" --direct=1 \
        --ioengine=io_uring --iodepth=8 --refill_buffers --randrepeat=0 \
        --output=/dev/null
fi

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
warm_source() { cat "$SRC" >/dev/null; }

# time_it NAME CMD...: run CMD with a fresh destination, record seconds under NAME.
time_it() {
    local name=$1; shift
    rm -f "$DST"
    if [ "$MODE" = cold ]; then drop_caches; else warm_source; fi
    local start end
    start=$(date +%s%N)
    "$@" >/dev/null 2>"$DIR/stderr" || { echo "$name failed:" >&2; cat "$DIR/stderr" >&2; exit 1; }
    end=$(date +%s%N)
    echo "$MODE $name $(awk "BEGIN { print ($end - $start) / 1e9 }")" >>"$RESULTS"
}

fio_copy() {
    # The disk's copy limit: one O_DIRECT reader of SRC and one O_DIRECT writer of DST at
    # the same time, 1 MiB requests, 16 in flight each, fsync at the end of the write job.
    fio --output=/dev/null --ioengine=io_uring --direct=1 --bs=1M --iodepth=16 --size="$SIZE" \
        "${FIO_MEMORY[@]}" --name=read --filename="$SRC" --rw=read \
        --name=write --filename="$DST" --rw=write --end_fsync=1
}

for run in $(seq 1 "$RUNS"); do
    for MODE in cold cached; do
        echo "== run $run/$RUNS, $MODE"
        time_it tidemark "$BIN" copy "$SRC" "$DST"
        time_it dd-buffered dd if="$SRC" of="$DST" bs=1M conv=fsync status=none
        time_it dd-direct dd if="$SRC" of="$DST" bs=1M iflag=direct oflag=direct conv=fsync status=none
        time_it cp sh -c 'cp "$1" "$2" && sync "$2"' - "$SRC" "$DST"
        time_it qemu-img sh -c 'qemu-img convert -f raw -O raw -t none -T none -m 8 -W "$1" "$2" && sync "$2"' - "$SRC" "$DST"
        time_it nbdcopy sh -c 'nbdcopy "$1" "$2" && sync "$2"' - "$SRC" "$DST"
        time_it fio-limit fio_copy
    done
done

# update-img: IMAGE is an older copy of SRC; CHANGED lists scattered 64 KiB extents.
IMAGE=$DIR/image.img
rm -f "$DST"
cp --reflink=auto "$SRC" "$IMAGE"
cat >"$DIR/loop4k.py" <<'PY'
# dattobd's update-img method: for each changed extent, 4 KiB at a time, one synchronous
# pread from the snapshot and one pwrite into the image, through the page cache; one
# fsync at the end (dattobd never syncs; we do, as every tool here is timed to durability).
import os, sys
snap = os.open(sys.argv[1], os.O_RDONLY)
image = os.open(sys.argv[3], os.O_WRONLY)
for line in open(sys.argv[2]):
    offset, length = map(int, line.split())
    for at in range(offset, offset + length, 4096):
        os.pwrite(image, os.pread(snap, 4096, at), at)
os.fsync(image)
PY
for pct in 1 10; do
    python3 - "$SIZE" "$pct" >"$DIR/changed-$pct.txt" <<'PY'
import random, sys
size, pct = int(sys.argv[1]), int(sys.argv[2])
chunks = size // 65536
random.seed(pct)
for c in sorted(random.sample(range(chunks), chunks * pct // 100)):
    print(c * 65536, 65536)
PY
done
time_upd() {
    local name=$1; shift
    drop_caches
    local start end
    start=$(date +%s%N)
    "$@" >/dev/null 2>"$DIR/stderr" || { echo "$name failed:" >&2; cat "$DIR/stderr" >&2; exit 1; }
    end=$(date +%s%N)
    echo "cold $name $(awk "BEGIN { print ($end - $start) / 1e9 }")" >>"$RESULTS"
}
for run in $(seq 1 "$RUNS"); do
    echo "== update-img run $run/$RUNS"
    for pct in 1 10; do
        time_upd "update-img-$pct%" "$BIN" update-img "$SRC" "$DIR/changed-$pct.txt" "$IMAGE"
        time_upd "loop4k-$pct%" python3 "$DIR/loop4k.py" "$SRC" "$DIR/changed-$pct.txt" "$IMAGE"
    done
done

DONE=1
echo
python3 - "$RESULTS" "$SIZE" <<'PY'
import statistics, sys
from collections import defaultdict
size = int(sys.argv[2])
times = defaultdict(list)
for line in open(sys.argv[1]):
    mode, name, secs = line.split()
    times[(mode, name)].append(float(secs))
med = {k: statistics.median(v) for k, v in times.items()}
mib = size / (1 << 20)
for mode in ("cold", "cached"):
    rows = [(n, t) for (m, n), t in med.items() if m == mode and not n.startswith(("update-img", "loop4k"))]
    if not rows:
        continue
    print(f"full copy of {size >> 30} GiB, {mode} (median of {len(times[(mode, 'tidemark')])} runs):")
    ours = med[(mode, "tidemark")]
    peers = [t for n, t in rows if not n.startswith("tidemark")]
    for name, t in sorted(rows, key=lambda r: r[1]):
        print(f"  {name:18} {t:7.2f} s  {mib / t:7.0f} MiB/s   tidemark is {t / ours:5.2f}x its speed")
    best = min(t for n, t in rows if not n.startswith(("tidemark", "fio")))
    print(f"  tidemark vs best peer (excluding fio): {best / ours:.2f}x (target >= 1.00, aim 1.15)")
    print(f"  tidemark vs fio read+write limit:      {med[(mode, 'fio-limit')] / ours:.2f}x")
full = med[("cold", "tidemark")]
for pct in (1, 10):
    ours, loop = med.get(("cold", f"update-img-{pct}%")), med.get(("cold", f"loop4k-{pct}%"))
    if ours is None:
        continue
    print(f"update-img, {pct}% changed in 64 KiB extents, cold: tidemark {ours:.2f} s, 4 KiB loop {loop:.2f} s:"
          f" {loop / ours:.1f}x faster; {100 * ours / full:.1f}% of a full copy")
print("targets: update-img 1% <= 5% of full-copy time and >= 10x the 4 KiB loop")
PY
