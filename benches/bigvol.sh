#!/usr/bin/env bash
# Metadata that grows with change, not with volume size (issue 21, item 3).
#
# A. A 64 TiB volume (sparse backing on a small xfs on a loop file: ext4 files stop at
#    16 TiB; the daemon's state dir on the same xfs), 64 KiB granularity, seven checkpoints
#    with 0.01% of the blocks dirtied between the first and the last (scattered 4 MiB runs,
#    written as NBD WRITE_ZEROES through the live export so no data space is used), a
#    backup in progress whose dirty bitmap a client maps (nbdinfo --map): the daemon's
#    RSS (VmRSS, VmHWM), du of the state dir, checkpoint creation times, and the daemon's
#    start time with that state.
# B. A 15 TiB volume with 1% of its blocks dirty in scattered runs of 1-32 blocks:
#    `nbdinfo --map` of qemu:dirty-bitmap extents per second (median of 3), with the CPU
#    nbdinfo and the server spend per map, and the map and planning time of `tidemark
#    pull --bitmap` (its `map_seconds`, median of 3). Beside it, nbdkit serving the same
#    extents from a list (null plugin, extentlist filter) with its default 16 threads and
#    with one (-t 1). The bound on the last line: nbdinfo sends one request at a time, so
#    nothing overlaps and a map takes at least nbdinfo's CPU plus the server's; the rate
#    at that sum, and at nbdinfo's CPU alone (an instant server), beside the measured one.
#
# The state is built once with TIDEMARK_BIN; every measurement then runs with each binary
# to compare (BEFORE_BIN, e.g. a build of main, then TIDEMARK_BIN) on that same state, so
# before and after share one run, one machine load and one page cache.
#
# Usage (root: it mounts a loop device): benches/bigvol.sh [a|b]...  (default: a b)
#   env TIDEMARK_BIN (default target/release/tidemark), BEFORE_BIN (optional: the binary
#   to compare with; its state formats must be the same), BIGVOL_DIR (default a new dir
#   in /var/tmp, removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
[[ -x $bin ]] || { echo "bigvol: build first: cargo build --release -p tidemark" >&2; exit 1; }
before=${BEFORE_BIN:-}
[[ -z $before || -x $before ]] || { echo "bigvol: BEFORE_BIN $before is not executable" >&2; exit 1; }
parts=("$@")
((${#parts[@]})) || parts=(a b)
# The binaries measured, as "label=path".
runs=()
[[ -n $before ]] && runs+=("before=$before")
runs+=("after=$bin")
[[ $(id -u) == 0 ]] || { echo "bigvol: run as root (it mounts an xfs loop file)" >&2; exit 1; }
for tool in mkfs.xfs nbdinfo nbdkit jq /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "bigvol: $tool missing (scripts/install-deps.sh)" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nbd' || { echo "bigvol: python3-libnbd missing" >&2; exit 1; }

dir=${BIGVOL_DIR:-$(mktemp -d /var/tmp/tidemark-bigvol.XXXXXX)}
mnt=$dir/mnt
pid= loop=
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    mountpoint -q "$mnt" && umount "$mnt"
    [[ -n $loop ]] && losetup -d "$loop" 2>/dev/null || true
    [[ -z ${BIGVOL_DIR:-} ]] && rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$mnt"
truncate -s 4G "$dir/xfs.img"
mkfs.xfs -q "$dir/xfs.img"
loop=$(losetup -f --show "$dir/xfs.img")
mount "$loop" "$mnt"

ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
load() { cut -d' ' -f1 /proc/loadavg; }

start_daemon() { # state dir [binary]
    local t0=$EPOCHREALTIME
    state=$1 ctl=$1/ctl.sock sock=$1/nbd.sock daemon_bin=${2:-$bin}
    "$daemon_bin" serve --state-dir "$state" --control "$ctl" --socket "$sock" 2>>"$dir/serve.log" &
    pid=$!
    until "$bin" info --control "$ctl" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || { echo "bigvol: the daemon died:" >&2; tail -5 "$dir/serve.log" >&2; exit 1; }
        sleep 0.01
    done
    started_ms=$(ms "$t0" "$EPOCHREALTIME")
}
stop_daemon() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }
tm() { "$bin" "$@" --control "$ctl"; }

# Dirty FRACTION of the blocks of export NAME (SIZE bytes, granularity 64 KiB) with
# WRITE_ZEROES in runs of MIN..MAX blocks at random places (seeded), 64 requests in flight.
dirty() { # name size fraction min max seed
    /usr/bin/python3 - "$sock" "$@" <<'PY'
import random, sys, nbd
sock, name, size, fraction, lo, hi, seed = sys.argv[1:]
size, fraction, lo, hi = int(size), float(fraction), int(lo), int(hi)
g = 65536
blocks = size // g
want = int(blocks * fraction)
rng = random.Random(int(seed))
h = nbd.NBD()
h.set_export_name(name)
h.connect_unix(sock)
done = 0
while done < want:
    n = min(rng.randint(lo, hi), want - done)
    start = rng.randrange(0, blocks - n)
    while h.aio_in_flight() >= 64:
        h.poll(-1)
    h.aio_zero(n * g, start * g)
    done += n
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
h.shutdown()
PY
}

rss_mib() { awk -v k="$1" '$1 == k":" {print int($2 / 1024)}' "/proc/$pid/status"; }

# CPU seconds (user + system) process PID has used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# Map CONTEXT of URI with nbdinfo three times while server PID serves it: sets rates
# (extents/s of each), rate_b (their median), extents_b, client_ms (nbdinfo's CPU per
# map, median) and server_ms (the server's CPU per map, mean); keeps the first map in
# $dir/map.txt.
map_rates() { # uri context pid
    local t0 t s0 cpus=() k
    rates=()
    s0=$(cpu_s "$3")
    for k in 1 2 3; do
        t0=$EPOCHREALTIME
        /usr/bin/time -f '%U %S' -o "$dir/time.txt" nbdinfo --map="$2" "$1" >"$dir/map.$k.txt"
        t=$(ms "$t0" "$EPOCHREALTIME")
        extents_b=$(wc -l <"$dir/map.$k.txt")
        rates+=("$(awk -v n="$extents_b" -v t="$t" 'BEGIN { printf "%.0f", n / (t / 1000) }')")
        cpus+=("$(awk '{ printf "%.0f", ($1 + $2) * 1000 }' "$dir/time.txt")")
    done
    server_ms=$(awk -v a="$s0" -v b="$(cpu_s "$3")" 'BEGIN { printf "%.0f", (b - a) * 1000 / 3 }')
    mv "$dir/map.1.txt" "$dir/map.txt"
    rm -f "$dir/map.2.txt" "$dir/map.3.txt"
    rate_b=$(printf '%s\n' "${rates[@]}" | median)
    client_ms=$(printf '%s\n' "${cpus[@]}" | median)
}

part_a() {
echo "## A. 64 TiB, 64 KiB granularity, seven checkpoints, 0.01% dirty (load $(load))"
local size_a=$((64 << 40))
mkdir -m 700 "$mnt/state-a"
start_daemon "$mnt/state-a"
tm volume create big --backing "$mnt/big.raw" --size 64T >/dev/null
local create_ms=() c t0
for c in 1 2 3 4 5 6 7; do
    t0=$EPOCHREALTIME
    tm checkpoint create big "c$c" >/dev/null
    create_ms+=("$(ms "$t0" "$EPOCHREALTIME")")
    # 0.01% of the blocks over the seven intervals, in runs of 64 blocks (4 MiB).
    dirty big "$size_a" 0.0000143 64 64 "$c"
done
local changed
changed=$(tm checkpoint list big --json | jq '.[0].changed_blocks')
local du_a apparent_a
du_a=$(du -sk "$mnt/state-a" | cut -f1)
apparent_a=$(du -sk --apparent-size "$mnt/state-a" | cut -f1)
stop_daemon
printf 'changed blocks since c1: %s of %s (%.4f%%); state dir du %s KiB (apparent %s KiB); checkpoint create c1..c7: %s ms\n\n' \
    "$changed" $((size_a / 65536)) "$(awk -v c="$changed" -v b=$((size_a / 65536)) 'BEGIN { print c * 100 / b }')" \
    "$du_a" "$apparent_a" "${create_ms[*]}"
printf '| binary | start, median of 3 (all) | RSS after start | extents mapped (ms) | RSS in backup | peak RSS | load |\n'
printf '|---|---|---|---|---|---|---|\n'
local run label path starts rss_start extents_a map_a_ms rss_a hwm_a
for run in "${runs[@]}"; do
    label=${run%%=*} path=${run#*=}
    starts=()
    for _ in 1 2 3; do
        start_daemon "$mnt/state-a" "$path"
        starts+=("$started_ms")
        rss_start=$(rss_mib VmRSS)
        stop_daemon
    done
    start_daemon "$mnt/state-a" "$path"
    tm backup begin big --incremental c1 >/dev/null
    t0=$EPOCHREALTIME
    extents_a=$(nbdinfo --map=qemu:dirty-bitmap:c1 "nbd+unix:///big@backup?socket=$sock" | wc -l)
    map_a_ms=$(ms "$t0" "$EPOCHREALTIME")
    rss_a=$(rss_mib VmRSS)
    hwm_a=$(rss_mib VmHWM)
    tm backup end big >/dev/null
    stop_daemon
    printf '| %s | %s ms (%s) | %s MiB | %s (%s ms) | %s MiB | %s MiB | %s |\n' "$label" \
        "$(printf '%s\n' "${starts[@]}" | median)" "${starts[*]}" "$rss_start" \
        "$extents_a" "$map_a_ms" "$rss_a" "$hwm_a" "$(load)"
done
rm -f "$mnt/big.raw"
rm -rf "$mnt/state-a"
}

part_b() {
echo
echo "## B. 15 TiB, 1% dirty in scattered runs of 1-32 blocks (load $(load))"
local size_b=$((15 << 40))
mkdir -m 700 "$mnt/state-b"
start_daemon "$mnt/state-b"
tm volume create mid --backing "$mnt/mid.raw" --size 15T >/dev/null
tm checkpoint create mid c0 >/dev/null
local t0 dirty_s
t0=$EPOCHREALTIME
dirty mid "$size_b" 0.01 1 32 99
dirty_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
stop_daemon
local uri="nbd+unix:///mid@backup?socket=$mnt/state-b/nbd.sock"
truncate -s 15T "$mnt/mid-copy.raw"
echo "dirtying: $dirty_s s"
echo
printf '| server | extents | nbdinfo --map extents/s, median of 3 (all) | nbdinfo CPU ms/map | server CPU ms/map | pull map + plan s, median of 3 (all) | load |\n'
printf '|---|---|---|---|---|---|---|\n'
local run label path maps
for run in "${runs[@]}"; do
    label=${run%%=*} path=${run#*=}
    start_daemon "$mnt/state-b" "$path"
    tm backup begin mid --incremental c0 >/dev/null
    map_rates "$uri" qemu:dirty-bitmap:c0 "$pid"
    maps=()
    for _ in 1 2 3; do
        "$path" pull --bitmap c0 "$uri" --into "$mnt/mid-copy.raw" --json >"$dir/pull.json"
        maps+=("$(jq .map_seconds "$dir/pull.json")")
    done
    tm backup end mid >/dev/null
    stop_daemon
    printf '| tidemark %s | %s | %s (%s) | %s | %s | %s (%s) | %s |\n' "$label" "$extents_b" \
        "$rate_b" "${rates[*]}" "$client_ms" "$server_ms" \
        "$(printf '%s\n' "${maps[@]}" | median)" "${maps[*]}" "$(load)"
    after_rate=$rate_b after_client=$client_ms after_server=$server_ms
done
# The peer: nbdkit serving the same extents from a list (the null plugin under the
# extentlist filter, dirty as data and clean as a hole), as base:allocation, with its
# default 16 threads per connection and with one.
awk '{ print $1, $2, ($3 == 1 ? 0 : "hole,zero") }' "$dir/map.txt" >"$dir/extents.list"
local threads
for threads in 16 1; do
    rm -f "$dir/nbdkit.sock"
    nbdkit -r -f -U "$dir/nbdkit.sock" -t "$threads" --filter=extentlist null size=15T \
        extentlist="$dir/extents.list" &
    pid=$!
    until [[ -S $dir/nbdkit.sock ]]; do sleep 0.01; done
    map_rates "nbd+unix://?socket=$dir/nbdkit.sock" base:allocation "$pid"
    stop_daemon
    printf '| nbdkit -t %s, extentlist | %s | %s (%s) | %s | %s | - | %s |\n' "$threads" \
        "$extents_b" "$rate_b" "${rates[*]}" "$client_ms" "$server_ms" "$(load)"
done
echo
awk -v n="$extents_b" -v r="$after_rate" -v c="$after_client" -v s="$after_server" 'BEGIN {
    printf "bound (tidemark %s): nbdinfo CPU alone %d ms/map -> %.0f extents/s; nbdinfo + server CPU %d ms/map -> %.0f extents/s; measured / that: %.2f\n", "'"${runs[-1]%%=*}"'", c, n / (c / 1000), c + s, n / ((c + s) / 1000), r / (n / ((c + s) / 1000)) }'
rm -f "$mnt/mid.raw" "$mnt/mid-copy.raw"
rm -rf "$mnt/state-b"
}

for part in "${parts[@]}"; do
    case $part in
        a) part_a ;;
        b) part_b ;;
        *) echo "bigvol: unknown part $part (a or b)" >&2; exit 2 ;;
    esac
done
