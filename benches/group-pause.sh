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
# load (goal: p99 < 50 ms), and fio's write rate during the loaded begins. Where the
# binary reports it (write_pause_phases_us), also where the pause went: p50/p99 of each
# phase (drain = closing every write gate, i.e. the writes in flight finishing; volumes =
# the volumes' part once every gate is held: bitmaps, COW stores, checkpoints) and the
# phases of the slowest begins.
# With TIDEMARK_BASELINE_BIN set (e.g. main's release build), the same run is made with it
# first as "base" and then with TIDEMARK_BIN as "after" (ROUNDS=2: base, after, base,
# after), each from fresh volumes, and the loaded figures are compared as ratios;
# TIDEMARK_MID_BIN adds a third binary ("mid", run between the two).
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
runs=1
[ -n "${TIDEMARK_BASELINE_BIN:-}" ] && runs=$((${ROUNDS:-2} * (${TIDEMARK_MID_BIN:+1} + 2)))
need=$(((runs * VOLUMES * VOLUME_MIB + 1024) << 20))
if [ "$(df --output=avail -B1 "$DIR" | tail -1)" -lt "$need" ]; then
    echo "$DIR needs $((need >> 20)) MiB free" >&2
    exit 2
fi

STATE=$DIR/state
SOCK=$STATE/nbd.sock
SERVE_PID=
FIO_PID=
stop() {
    [ -n "$FIO_PID" ] && kill "$FIO_PID" 2>/dev/null && wait "$FIO_PID" 2>/dev/null
    [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    FIO_PID=
    SERVE_PID=
}
cleanup() {
    stop
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
tm() { "$BIN" "$@" --state-dir "$STATE"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
: >"$DIR/pauses.txt"
: >"$DIR/runs.txt"

# begins N LABEL: N group begins (each an incremental backup from the previous one's
# checkpoint) and ends; appends "LABEL pause_us [phases_us...]" lines to pauses.txt.
begins() {
    local n=$1 label=$2 out
    for _ in $(seq "$n"); do
        local since=()
        [ "$CKPT" -gt 0 ] && since=(--incremental "b$CKPT")
        CKPT=$((CKPT + 1))
        out=$(tm backup begin "${names[@]}" --checkpoint "b$CKPT" "${since[@]}" --no-hooks --json)
        echo "$label $(printf '%s' "$out" | python3 -c '
import json, sys
b = json.load(sys.stdin)
p = b.get("write_pause_phases_us") or {}
print(b["write_pause_us"], *(p.get(k, "-") for k in ("drain", "volumes", "bitmaps", "cow_stores", "checkpoints")))')" \
            >>"$DIR/pauses.txt"
        tm backup end "${names[0]}" >/dev/null
    done
}

# run LABEL: one whole run with $BIN: fresh volumes, idle begins, loaded begins.
run() {
    local label=$1 idle_load loaded_load loaded_start loaded_secs
    # Fresh preallocated backing files for every run (the same start for each binary),
    # deleted only at the end: on a filesystem mounted with -o discard, deleting files
    # that fio fragmented takes minutes.
    local files=$DIR/$label
    echo "== $label ($BIN): setup: $VOLUMES volumes of $VOLUME_MIB MiB in $files"
    rm -rf "$STATE" "$files"
    mkdir -m 700 -p "$STATE" "$files"
    CKPT=0
    names=()
    for i in $(seq 0 $((VOLUMES - 1))); do
        fallocate -l "${VOLUME_MIB}M" "$files/v$i.raw"
        names+=("v$i")
    done
    "$BIN" serve --state-dir "$STATE" 2>"$DIR/serve-$label.log" &
    SERVE_PID=$!
    for _ in $(seq 100); do [ -S "$STATE/control.sock" ] && break; sleep 0.1; done
    for name in "${names[@]}"; do
        tm volume create "$name" --backing "$files/$name.raw" >/dev/null
    done

    echo "== $label: $IDLE_BEGINS begins without writers (load $(load))"
    begins "$IDLE_BEGINS" "$label-idle"
    idle_load=$(load)

    local jobs=() rate=()
    for name in "${names[@]}"; do
        jobs+=(--name="$name" --uri="nbd+unix:///$name?socket=$SOCK")
    done
    [ "$RATE_IOPS" -gt 0 ] && rate=(--rate_iops="$RATE_IOPS")
    fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=8 --size="${VOLUME_MIB}M" "${rate[@]}" \
        --time_based --runtime=86400 --group_reporting --output-format=json \
        --output="$DIR/fio-$label.json" "${jobs[@]}" &
    FIO_PID=$!
    sleep 5
    kill -0 "$FIO_PID" 2>/dev/null || { echo "fio did not start:" >&2; cat "$DIR/fio-$label.json" >&2; exit 1; }
    echo "== $label: $BEGINS begins while fio writes to all $VOLUMES volumes (load $(load))"
    loaded_start=$(date +%s%N)
    begins "$BEGINS" "$label-loaded"
    loaded_secs=$(awk "BEGIN { print ($(date +%s%N) - $loaded_start) / 1e9 }")
    loaded_load=$(load)
    kill -INT "$FIO_PID"
    wait "$FIO_PID" || true
    FIO_PID=
    echo "$label|$idle_load|$loaded_load|$loaded_secs|$DIR/fio-$label.json" >>"$DIR/runs.txt"
    stop
}

if [ -n "${TIDEMARK_BASELINE_BIN:-}" ]; then
    AFTER_BIN=$BIN
    for round in $(seq "${ROUNDS:-2}"); do
        BIN=$TIDEMARK_BASELINE_BIN
        run "base$round"
        if [ -n "${TIDEMARK_MID_BIN:-}" ]; then
            BIN=$TIDEMARK_MID_BIN
            run "mid$round"
        fi
        BIN=$AFTER_BIN
        run "after$round"
    done
else
    run this
fi

python3 - "$DIR/pauses.txt" "$DIR/runs.txt" "$VOLUMES" <<'PY'
import json, sys
from collections import defaultdict
pauses_file, runs_file, volumes = sys.argv[1:]
PHASES = ("drain", "volumes", "bitmaps", "cow_stores", "checkpoints")
pauses = defaultdict(list)
phases = defaultdict(list)
for line in open(pauses_file):
    label, us, *rest = line.split()
    pauses[label].append(int(us) / 1000)
    if rest and "-" not in rest:
        phases[label].append(dict(zip(PHASES, (int(x) / 1000 for x in rest))) | {"pause": int(us) / 1000})
def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, -(-len(values) * p // 100) - 1))]
runs = [line.rstrip("\n").split("|") for line in open(runs_file)]
loaded_by_run = {}
for run, idle_load, loaded_load, loaded_secs, fio_file in runs:
    for kind, load in (("idle", idle_load), ("loaded", loaded_load)):
        v = pauses[f"{run}-{kind}"]
        if v:
            print(f"{run:7} {kind:6} {len(v):3} begins of {volumes} volumes: write pause p50 {pct(v, 50):6.1f} ms, "
                  f"p99 {pct(v, 99):6.1f} ms, max {max(v):6.1f} ms  (load {load})")
    ph = phases[f"{run}-loaded"]
    if ph:
        print(f"{run:7} loaded phases p50/p99 ms: " + ", ".join(
            f"{k} {pct([p[k] for p in ph], 50):.1f}/{pct([p[k] for p in ph], 99):.1f}" for k in PHASES))
        for p in sorted(ph, key=lambda p: p["pause"])[-3:]:
            print(f"{run:7}   a slow begin: pause {p['pause']:.1f} ms = " + ", ".join(f"{k} {p[k]:.1f}" for k in PHASES))
    try:
        text = open(fio_file).read()
        # fio may put a line about the signal that ended it before the JSON.
        write = json.loads(text[text.index("{"):])["jobs"][0]["write"]
        print(f"{run:7} fio during the loaded begins: {write['iops']:.0f} writes/s of 4 KiB over {volumes} volumes "
              f"({write['bw'] / 1024:.1f} MiB/s, {loaded_secs} s of begins)")
    except (OSError, ValueError, KeyError, IndexError) as e:
        print(f"{run:7} fio's report could not be read: {e}")
    loaded_by_run[run] = pauses[f"{run}-loaded"]
    if pauses[f"{run}-idle"] and pauses[f"{run}-loaded"]:
        print(f"{run:7} loaded / idle p99: {pct(pauses[f'{run}-loaded'], 99) / pct(pauses[f'{run}-idle'], 99):.1f}x")
    print(f"{run:7} goal: loaded p99 < 50 ms: {'met' if pct(pauses[f'{run}-loaded'], 99) < 50 else 'MISSED'}")
def pooled(prefix):
    return [x for r, v in loaded_by_run.items() if r.startswith(prefix) for x in v]
b = pooled("base")
for label in ("mid", "after"):
    a = pooled(label)
    if b and a:
        print(f"all rounds, loaded: base p50 {pct(b, 50):.1f} / p99 {pct(b, 99):.1f} / max {max(b):.1f} ms; "
              f"{label} p50 {pct(a, 50):.1f} / p99 {pct(a, 99):.1f} / max {max(a):.1f} ms; "
              f"{label}/base p50 {pct(a, 50) / pct(b, 50):.2f}x, p99 {pct(a, 99) / pct(b, 99):.2f}x")
PY
