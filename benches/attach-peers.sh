#!/usr/bin/env bash
# Block-device front ends side by side (issue 16): fio with O_DIRECT on
#   tidemark   `tidemark volume attach --via fuse` (a loop device over the daemon's FUSE file),
#   backing    the raw file a volume sits on, directly (the ceiling),
#   nbdfuse    the peer for a FUSE-exposed block device: qemu-nbd serving a raw file,
#              nbdfuse making it a FUSE file, a loop device with direct I/O over that,
# for 1 MiB sequential read and write (QD 8) and 4 KiB random read and write (QD 32).
# Every round runs each target once, in a rotating order; the figure is the median over
# rounds, the ratios are tidemark / peer (>1 = faster), and the load is the median of the
# 1-minute load average at the start of each run of that row. Needs root (FUSE, loop).
# Cache state is controlled: before every read run, of every target, dirty pages are
# written back and the page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`),
# so no target reads data that an earlier run left in memory (qemu-nbd under nbdfuse reads
# its file through the page cache; tidemark and fio on the backing use O_DIRECT).
#
# Usage: bash benches/attach-peers.sh [SIZE_MIB] [ROUNDS] [SECONDS]   (defaults: 1024 3 5)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp),
#      TIDEMARK_BASELINE_BIN: another tidemark binary (e.g. the previous commit's) run as a
#      fourth target, `baseline`, in the same rounds, so before/after share one session.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
rounds=${2:-3}
secs=${3:-5}
bin=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
if [ ! -x "$bin" ]; then cargo build --release -p tidemark; fi
for tool in fio qemu-nbd nbdfuse losetup python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-deps.sh" >&2; exit 1; }
done

work=$(mktemp -d "${BENCH_DIR:-/tmp}/attach-peers.XXXXXX")
state=$work/state
baseline_state=$work/baseline-state
baseline_bin=${TIDEMARK_BASELINE_BIN:-}
pids=()
peer_loop=
cleanup() {
    [ -n "$peer_loop" ] && losetup -d "$peer_loop" 2>/dev/null || true
    "$bin" volume detach v --state-dir "$state" >/dev/null 2>&1 || true
    [ -n "$baseline_bin" ] && "$baseline_bin" volume detach v --state-dir "$baseline_state" >/dev/null 2>&1 || true
    umount -l "$work/nbdfuse" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

size=$((size_mib * 1024 * 1024))
for f in vol.raw plain.raw peer.raw baseline.raw; do
    [ "$f" = baseline.raw ] && [ -z "$baseline_bin" ] && continue
    head -c "$size" /dev/urandom >"$work/$f"
done
sync

"$bin" serve --state-dir "$state" >"$work/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$state/control.sock" ] && break; sleep 0.1; done
"$bin" volume create v --backing "$work/vol.raw" --state-dir "$state" >/dev/null
dev_tidemark=$("$bin" volume attach v --via fuse --state-dir "$state")
if [ -n "$baseline_bin" ]; then
    "$baseline_bin" serve --state-dir "$baseline_state" >"$work/baseline.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$baseline_state/control.sock" ] && break; sleep 0.1; done
    "$baseline_bin" volume create v --backing "$work/baseline.raw" --state-dir "$baseline_state" >/dev/null
    dev_baseline=$("$baseline_bin" volume attach v --via fuse --state-dir "$baseline_state")
fi

qemu-nbd -f raw -t -e 16 --cache=writeback --aio=threads -k "$work/qemu.sock" "$work/peer.raw" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/qemu.sock" ] && break; sleep 0.1; done
mkdir -p "$work/nbdfuse"
nbdfuse "$work/nbdfuse/disk" "nbd+unix:///?socket=$work/qemu.sock" &
pids+=($!)
for _ in $(seq 100); do [ -e "$work/nbdfuse/disk" ] && break; sleep 0.1; done
peer_loop=$(losetup --direct-io=on -f --show "$work/nbdfuse/disk")

declare -A target=([tidemark]=$dev_tidemark [backing]=$work/plain.raw [nbdfuse]=$peer_loop)
names=(tidemark backing nbdfuse)
if [ -n "$baseline_bin" ]; then
    target[baseline]=$dev_baseline
    names+=(baseline)
fi
workloads=("seq-read read 1M 8" "seq-write write 1M 8" "rand-read randread 4k 32" "rand-write randwrite 4k 32")

# run TARGET RW BS QD: prints MB/s
run() {
    fio --name=b --filename="$1" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
        --iodepth="$4" --size="$size" --runtime="$secs" --time_based --group_reporting \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % ((j["read"]["bw_bytes"]+j["write"]["bw_bytes"])/1e6))'
}

results=$work/results
: >"$results"
for r in $(seq "$rounds"); do
    for w in "${workloads[@]}"; do
        read -r label rw bs qd <<<"$w"
        order=("${names[@]}")
        for ((k = 0; k < (r - 1) % ${#names[@]}; k++)); do order=("${order[@]:1}" "${order[0]}"); done
        for n in "${order[@]}"; do
            if [[ $rw == *read ]]; then
                sync
                echo 3 >/proc/sys/vm/drop_caches
            fi
            load=$(cut -d' ' -f1 /proc/loadavg)
            echo "$label $n $(run "${target[$n]}" "$rw" "$bs" "$qd") $load" >>"$results"
        done
    done
done

echo "## attach: fio O_DIRECT, ${size_mib} MiB, ${secs} s per run, median of $rounds ($(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
echo "Page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every read run of every target."
python3 - "$results" <<'EOF'
import statistics, sys
rows, loads = {}, {}
for line in open(sys.argv[1]):
    label, name, mbs, load = line.split()
    rows.setdefault(label, {}).setdefault(name, []).append(float(mbs))
    loads.setdefault(label, []).append(float(load))
baseline = any("baseline" in r for r in rows.values())
head = "| workload | tidemark (FUSE+loop) MB/s | backing file MB/s | nbdfuse+qemu-nbd MB/s |"
rule = "|---|---|---|---|"
if baseline:
    head += " baseline tidemark MB/s |"
    rule += "---|"
head += " vs nbdfuse | vs backing |"
rule += "---|---|"
if baseline:
    head += " vs baseline |"
    rule += "---|"
print(head + " load |")
print(rule + "---|")
for label in ["seq-read", "seq-write", "rand-read", "rand-write"]:
    m = {n: statistics.median(v) for n, v in rows[label].items()}
    line = f"| {label} | {m['tidemark']:.1f} | {m['backing']:.1f} | {m['nbdfuse']:.1f} |"
    if baseline:
        line += f" {m['baseline']:.1f} |"
    line += f" {m['tidemark'] / m['nbdfuse']:.2f}x | {m['tidemark'] / m['backing']:.2f}x |"
    if baseline:
        line += f" {m['tidemark'] / m['baseline']:.2f}x |"
    print(line + f" {statistics.median(loads[label]):.1f} |")
EOF
