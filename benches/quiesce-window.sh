#!/usr/bin/env bash
# The freeze window, tidemark vs fsfreeze(8): how long writers are blocked around a
# (no-op) snapshot of an ext4 on a loop device that holds DIRTY_MIB of unwritten data.
# fsfreeze -f syncs inside the freeze; tidemark syncs (syncfs) before it opens the window,
# so FIFREEZE finds little to write. "total" is the whole quiesce+thaw call.
# Usage (root): bash benches/quiesce-window.sh [RUNS=7] [DIRTY_MIB=64]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
dirty_mib=${2:-64}
cargo build --release -q -p tidemark -p tidemark-tests --bins
tidemark=$PWD/target/release/tidemark
probe=$PWD/target/release/quiesce-probe
work=$(mktemp -d /var/tmp/tidemark-quiesce-bench.XXXXXX)
dev=
cleanup() {
    fsfreeze -u "$work/mnt" 2>/dev/null || true
    umount "$work/mnt" 2>/dev/null || true
    [ -z "$dev" ] || losetup -d "$dev"
    rm -rf "$work"
}
trap cleanup EXIT
truncate -s 1G "$work/fs.img"
mkfs.ext4 -q -F "$work/fs.img"
dev=$(losetup --find --show "$work/fs.img")
mkdir "$work/mnt"
mount "$dev" "$work/mnt"
head -c $((dirty_mib << 20)) /dev/urandom > "$work/source"
make_dirty() { rm -f "$work/mnt/dirty"; cp "$work/source" "$work/mnt/dirty"; }
now_ns() { date +%s%N; }
median() { sort -n | awk '{ v[NR] = $1 } END { printf "%.1f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

peer=() ours=() ours_total=()
for ((i = 0; i < runs; i++)); do
    make_dirty
    t0=$(now_ns); fsfreeze -f "$work/mnt"; fsfreeze -u "$work/mnt"; t1=$(now_ns)
    peer+=("$(( (t1 - t0) / 1000 ))")
    make_dirty
    spec="{\"mountpoints\": [\"$work/mnt\"], \"watchdog_exe\": \"$tidemark\"}"
    t0=$(now_ns)
    out=$(echo thaw | "$probe" "$spec")
    t1=$(now_ns)
    ours+=("$(printf '%s\n' "$out" | /usr/bin/python3 -c 'import json, sys
lines = [json.loads(l) for l in sys.stdin if l.strip()]
print(int(lines[-1]["thawed"]["freeze_to_thaw_ms"] * 1000))')")
    ours_total+=("$(( (t1 - t0) / 1000 ))")
done
to_ms() { awk '{ printf "%.3f\n", $1 / 1000 }'; }
p=$(printf '%s\n' "${peer[@]}" | to_ms | median)
o=$(printf '%s\n' "${ours[@]}" | to_ms | median)
t=$(printf '%s\n' "${ours_total[@]}" | to_ms | median)
echo "freeze window with ${dirty_mib} MiB dirty, median of ${runs} runs:"
echo "  fsfreeze -f; fsfreeze -u     ${p} ms blocked"
echo "  tidemark quiesce + thaw      ${o} ms blocked (whole call incl. syncfs and watchdog start: ${t} ms)"
awk -v p="$p" -v o="$o" 'BEGIN { printf "  ratio: fsfreeze window / tidemark window = %.1fx\n", p / o }'
