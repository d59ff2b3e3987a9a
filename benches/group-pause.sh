#!/usr/bin/env bash
# Issue 21 item 3: the write pause of `backup begin` for a group of volumes while fio
# writes to all of them.
#
#   bash benches/group-pause.sh [BEGINS] [VOLUMES] [VOLUME_MIB]   (defaults: 100, 16, 512; root)
#
# A `tidemark serve` of its own with VOLUMES volumes (preallocated backing files of
# VOLUME_MIB on the main disk). One fio process writes to every volume's live NBD export
# (fio's nbd engine: 4 KiB random writes, 8 in flight per volume, RATE_IOPS per volume,
# default 250, i.e. 4000 writes/s for 16 volumes; RATE_IOPS=0 is unthrottled, which on
# this shared VM saturates the disk for every other process) for the whole run. Then
# BEGINS times: `backup begin` of all the volumes in one group (an
# incremental backup: a new checkpoint per begin, the changes since the previous one
# frozen and exported), then `backup end`. The pause is what the daemon measures and
# reports as write_pause_us: a monotonic clock around the section in which writes to the
# group are held (from asking for the first volume's write gate, which waits for
# in-flight writes, to releasing the last). The same begins are timed first without fio
# (IDLE_BEGINS, default 20) for the ratio loaded / idle. Prints p50, p99 and max with the
# load (goal: p99 < 50 ms), and fio's write rate during the loaded begins.
# Env: BENCH_DIR (default /var/tmp/tidemark-group-pause), TIDEMARK_BIN (default
# target/release/tidemark), KEEP=1 keeps the files.
set -euo pipefail
cd "$(dirname "$0")/.."
BEGINS=${1:-100}
VOLUMES=${2:-16}
VOLUME_MIB=${3:-512}
IDLE_BEGINS=${IDLE_BEGINS:-20}
RATE_IOPS=${RATE_IOPS:-250}
DIR=${BENCH_DIR:-/var/tmp/tidemark-group-pause}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}

[ "$(id -u)" = 0 ] || { echo "run as root: the daemon's volumes need it" >&2; exit 2; }
for tool in fio python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (bash scripts/install-deps.sh)" >&2; exit 2; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "this fio has no nbd engine" >&2; exit 2; }
[ -x "$BIN" ] || cargo build --release -q -p tidemark
mkdir -p "$DIR"
if [ "$(findmnt -n -o FSTYPE --target "$DIR")" = tmpfs ]; then
    echo "$DIR is on tmpfs; set BENCH_DIR to a directory on a real disk" >&2
    exit 2
fi
need=$(((VOLUMES * VOLUME_MIB + 1024) << 20))
if [ "$(df --output=avail -B1 "$DIR" | tail -1)" -lt "$need" ]; then
    echo "$DIR needs $((need >> 20)) MiB free" >&2
    exit 2
fi

STATE=$DIR/state
SOCK=$STATE/nbd.sock
SERVE_PID=
FIO_PID=
cleanup() {
    [ -n "$FIO_PID" ] && kill "$FIO_PID" 2>/dev/null && wait "$FIO_PID" 2>/dev/null
    [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
tm() { "$BIN" "$@" --state-dir "$STATE"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "== setup: $VOLUMES volumes of $VOLUME_MIB MiB in $DIR"
rm -rf "$STATE" "$DIR"/v*.raw
mkdir -m 700 -p "$STATE"
names=()
for i in $(seq 0 $((VOLUMES - 1))); do
    fallocate -l "${VOLUME_MIB}M" "$DIR/v$i.raw"
    names+=("v$i")
done
"$BIN" serve --state-dir "$STATE" 2>"$DIR/serve.log" &
SERVE_PID=$!
for _ in $(seq 100); do [ -S "$STATE/control.sock" ] && break; sleep 0.1; done
for name in "${names[@]}"; do
    tm volume create "$name" --backing "$DIR/$name.raw" >/dev/null
done

# begins N LABEL: N group begins (each an incremental backup from the previous one's
# checkpoint) and ends; appends "LABEL pause_us" lines to $DIR/pauses.txt.
CKPT=0
begins() {
    local n=$1 label=$2 out
    for _ in $(seq "$n"); do
        local since=()
        [ "$CKPT" -gt 0 ] && since=(--incremental "b$CKPT")
        CKPT=$((CKPT + 1))
        out=$(tm backup begin "${names[@]}" --checkpoint "b$CKPT" "${since[@]}" --no-hooks --json)
        echo "$label $(printf '%s' "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["write_pause_us"])')" \
            >>"$DIR/pauses.txt"
        tm backup end "${names[0]}" >/dev/null
    done
}

: >"$DIR/pauses.txt"
echo "== $IDLE_BEGINS begins without writers (load $(load))"
begins "$IDLE_BEGINS" idle
idle_load=$(load)

jobs=()
for name in "${names[@]}"; do
    jobs+=(--name="$name" --uri="nbd+unix:///$name?socket=$SOCK")
done
rate=()
[ "$RATE_IOPS" -gt 0 ] && rate=(--rate_iops="$RATE_IOPS")
fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=8 --size="${VOLUME_MIB}M" "${rate[@]}" \
    --time_based --runtime=86400 --group_reporting --output-format=json \
    --output="$DIR/fio.json" "${jobs[@]}" &
FIO_PID=$!
sleep 5
kill -0 "$FIO_PID" 2>/dev/null || { echo "fio did not start:" >&2; cat "$DIR/fio.json" >&2; exit 1; }
echo "== $BEGINS begins while fio writes to all $VOLUMES volumes (load $(load))"
loaded_start=$(date +%s%N)
begins "$BEGINS" loaded
loaded_secs=$(awk "BEGIN { print ($(date +%s%N) - $loaded_start) / 1e9 }")
loaded_load=$(load)
kill -INT "$FIO_PID"
wait "$FIO_PID" || true
FIO_PID=

python3 - "$DIR/pauses.txt" "$DIR/fio.json" "$VOLUMES" "$idle_load" "$loaded_load" "$loaded_secs" <<'PY'
import json, sys
from collections import defaultdict
pauses_file, fio_file, volumes, idle_load, loaded_load, loaded_secs = sys.argv[1:]
pauses = defaultdict(list)
for line in open(pauses_file):
    label, us = line.split()
    pauses[label].append(int(us) / 1000)
def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, -(-len(values) * p // 100) - 1))]
for label, load in (("idle", idle_load), ("loaded", loaded_load)):
    v = pauses[label]
    if v:
        print(f"{label:6} {len(v):3} begins of {volumes} volumes: write pause p50 {pct(v, 50):6.1f} ms, "
              f"p99 {pct(v, 99):6.1f} ms, max {max(v):6.1f} ms  (load {load})")
try:
    text = open(fio_file).read()
    # fio may put a line about the signal that ended it before the JSON.
    write = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    print(f"fio during the loaded begins: {write['iops']:.0f} writes/s of 4 KiB over {volumes} volumes "
          f"({write['bw'] / 1024:.1f} MiB/s, {loaded_secs} s of begins)")
except (OSError, ValueError, KeyError, IndexError) as e:
    print(f"fio's report could not be read: {e}")
if pauses["idle"] and pauses["loaded"]:
    print(f"loaded / idle p99: {pct(pauses['loaded'], 99) / pct(pauses['idle'], 99):.1f}x")
print(f"goal: loaded p99 < 50 ms: {'met' if pct(pauses['loaded'], 99) < 50 else 'MISSED'}")
PY
