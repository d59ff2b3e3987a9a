#!/usr/bin/env bash
# Accuracy of `tidemark bench` against fio (Debian's fio, io_uring engine), in one run.
#
# Both tools measure the same file on the main disk with the same workloads (issue 8):
# sequential 1 MiB and random 4 KiB, reads and writes, QD32, O_DIRECT, time-based, writes
# ending with an fsync. Each workload runs as --runs paired samples; a sample is four runs
# in ABBA order (fio, tidemark, tidemark, fio; the next sample BAAB), and its ratio is
# tidemark's MB/s over fio's summed over the sample, so linear drift and the position
# inside a sample (disk bursts, other processes on this noisy 2-core machine) hit both
# tools alike. Reported: the median MB/s, IOPS and p50 latency of each tool, the median of
# the per-sample ratios tidemark/fio and their spread; a workload passes when the median
# ratio is within 10% of 1.
#
# Both tools use registered buffers (fio --fixedbufs=1) of the same kind of memory, because
# on this disk the memory decides large-block throughput. It is a virtio disk without
# indirect descriptors (feature bit 28 off in /sys/bus/virtio/devices/*/features): every
# segment of a request takes one descriptor of the virtqueue, and a 1 MiB buffer in 4 KiB
# pages is 256 segments, split by the block layer into a 254-segment request that fills the
# whole queue and an 8 KiB one. The disk then holds one large request at a time, whatever
# the queue depth, and a tool's figure is set by how fast its next request reaches the
# driver after each completion (fio's mostly wait in blk-mq's requeue list for kblockd).
# A buffer inside one 2 MiB huge page is one segment, and QD32 reaches the disk. So:
# - main pairing: tidemark's default buffers (transparent huge pages) against fio's
#   --iomem=shmhuge (hugetlb pages this script reserves for the run and gives back);
# - "small pages" pairing, 1 MiB only: tidemark --small-pages against fio's default
#   malloc'd buffers, both 4 KiB pages, both held to one large request at a time.
# A workload passes when its median ratio is within 10% of 1; the small-pages rows are
# reported, not judged (they measure the two tools' dispatch paths into a full virtqueue).
# Where hugetlb pages cannot be reserved (not root), the main pairing uses small pages on
# both sides and says so.
#
# Each run also reads the disk's own counters (/sys/dev/block/MAJ:MIN/stat) before and
# after, and the table shows the bytes the disk moved over the bytes each tool reported: a
# tool whose figures come from real completions stays at 1.00 (a little above on writes:
# the filesystem's journal and the final fsync).
#
# Usage: benches/bench-vs-fio.sh [--runs N] [--time SECONDS] [--size SIZE] [--dir DIR]
#   env TIDEMARK_BIN: the binary to measure (default: target/release/tidemark, built);
#   env BENCH_RUNS: default for --runs (5).
# Exit status: 0 when every workload agrees within 10%, 1 when one does not, 2 on errors.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BENCH_RUNS:-5}
seconds=2
size=2G
dir=/var/tmp
while (($#)); do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --time) seconds=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) echo "bench-vs-fio: unknown argument $1" >&2; exit 2 ;;
    esac
done

command -v fio >/dev/null || { echo "bench-vs-fio: fio is not installed (scripts/install-deps.sh)" >&2; exit 2; }
if [[ -z "${TIDEMARK_BIN:-}" ]]; then
    cargo build --release --quiet -p tidemark
    TIDEMARK_BIN=$PWD/target/release/tidemark
fi
fstype=$(stat -f -c %T "$dir")
if [[ "$fstype" == tmpfs || "$fstype" == ramfs ]]; then
    echo "bench-vs-fio: $dir is $fstype; O_DIRECT numbers need a real disk (use --dir)" >&2
    exit 2
fi

work=$(mktemp -d "$dir/tidemark-bench-vs-fio.XXXXXX")
trap 'rm -rf "$work"' EXIT
file=$work/target.img
# Lay the file out with real data first, so no run measures block allocation or holes.
"$TIDEMARK_BIN" bench --rw write --bs 1M --qd 32 --direct --size "$size" --json "$file" >/dev/null

# The disk under the file, for its byte counters (none on btrfs and other virtual ones).
disk_stat=/sys/dev/block/$(findmnt -n -o MAJ:MIN -T "$file" | tr -d ' ')/stat
[[ -r "$disk_stat" ]] || disk_stat=
disk_bytes() { # rw -> bytes the disk has read (reads) or written (writes) so far
    if [[ -z "$disk_stat" ]]; then echo 0; return; fi
    local -a f
    read -r -a f <"$disk_stat"
    if [[ "$1" == *read ]]; then echo $((f[2] * 512)); else echo $((f[6] * 512)); fi
}

# Huge pages for fio's buffers (32 x 1 MiB plus its alignment slack), given back on exit.
hugetlb=/proc/sys/vm/nr_hugepages
huge_before=$(cat "$hugetlb" 2>/dev/null || echo "")
fio_huge=(--iomem=shmhuge)
tidemark_huge=()
main_memory=huge
if [[ -n "$huge_before" ]] && echo $((huge_before + 32)) >"$hugetlb" 2>/dev/null \
    && (($(awk '/HugePages_Free/ {print $2}' /proc/meminfo) >= 32)); then
    trap 'echo "$huge_before" >"$hugetlb"; rm -rf "$work"' EXIT
else
    [[ -n "$huge_before" ]] && echo "$huge_before" >"$hugetlb" 2>/dev/null || true
    echo "bench-vs-fio: cannot reserve hugetlb pages for fio; both tools use 4 KiB pages" >&2
    fio_huge=()
    tidemark_huge=(--small-pages)
    main_memory=small
fi

workloads=("read 1M $main_memory" "write 1M $main_memory" "randread 4K $main_memory"
    "randwrite 4K $main_memory")
[[ "$main_memory" == huge ]] && workloads+=("read 1M small" "write 1M small")
results=$work/results.tsv
: >"$results"

run_fio() { # rw bs memory out
    local memory=()
    [[ "$3" == huge ]] && memory=("${fio_huge[@]}")
    fio --name=bench-vs-fio --filename="$file" --ioengine=io_uring --direct=1 \
        --rw="$1" --bs="$2" --iodepth=32 --size="$size" --time_based --runtime="$seconds" \
        --fixedbufs=1 "${memory[@]}" --end_fsync=1 --output-format=json >"$4"
}
run_tidemark() { # rw bs memory out
    local memory=(--small-pages)
    [[ "$3" == huge ]] && memory=("${tidemark_huge[@]}")
    "$TIDEMARK_BIN" bench --rw "$1" --bs "$2" --qd 32 --direct --size "$size" \
        --time "$seconds" "${memory[@]}" --force --json "$file" >"$4"
}

echo "bench-vs-fio: $runs ABBA samples of ${seconds}s runs per workload on $file ($fstype, $size), QD32, O_DIRECT" >&2
for workload in "${workloads[@]}"; do
    read -r rw bs memory <<<"$workload"
    for ((run = 1; run <= runs; run++)); do
        if ((run % 2)); then order=(fio tidemark tidemark fio); else order=(tidemark fio fio tidemark); fi
        for ((slot = 0; slot < 4; slot++)); do
            tool=${order[$slot]}
            out=$work/$tool-$rw-$memory-$run-$slot.json
            before=$(disk_bytes "$rw")
            "run_$tool" "$rw" "$bs" "$memory" "$out"
            moved=$(($(disk_bytes "$rw") - before))
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rw" "$bs" "$memory" "$run" "$tool" "$out" \
                "$moved" >>"$results"
        done
        echo "  $rw $bs ($memory pages) sample $run/$runs done" >&2
    done
done

python3 - "$results" "$main_memory" <<'EOF'
import json, statistics, sys

def fio_figures(path):
    job = json.load(open(path))["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    return (side["bw_bytes"] / 1e6, side["iops"],
            side["clat_ns"]["percentile"]["50.000000"] / 1e3, side["io_bytes"])

def tidemark_figures(path):
    report = json.load(open(path))
    side = report["read"] or report["write"]
    return report["mb_per_sec"], report["iops"], side["latency_ns"]["p50"] / 1e3, report["bytes"]

runs = {}
for line in open(sys.argv[1]):
    rw, bs, memory, sample, tool, path, moved = line.rstrip("\n").split("\t")
    figures = fio_figures(path) if tool == "fio" else tidemark_figures(path)
    # The disk's bytes over the tool's (0 when the disk has no counters).
    figures = figures[:3] + (int(moved) / figures[3] if figures[3] else 0.0,)
    runs.setdefault((rw, bs, memory), {}).setdefault(sample, {}).setdefault(tool, []).append(figures)

med = statistics.median
print("| workload (QD32, O_DIRECT) | buffers | fio MB/s | tidemark MB/s | fio IOPS | tidemark IOPS "
      "| fio p50 us | tidemark p50 us | disk/fio bytes | disk/tidemark bytes "
      "| ratio (median of samples) | spread | within 10% |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
failed = 0
main_memory = sys.argv[2]  # the judged pairing's buffers; the other rows are reported only
for (rw, bs, memory), samples in runs.items():
    def every(tool, i):
        return [figures[i] for sample in samples.values() for figures in sample[tool]]
    ratios = sorted(sum(f[0] for f in s["tidemark"]) / sum(f[0] for f in s["fio"])
                    for s in samples.values())
    ratio = med(ratios)
    ok = abs(ratio - 1) <= 0.10
    judge = memory == main_memory
    failed += judge and not ok
    verdict = ("yes" if ok else "NO") if judge else ("yes" if ok else "no") + " (not judged)"
    pages = ("tidemark default, fio --iomem=shmhuge" if memory == "huge"
             else "4 KiB pages: tidemark --small-pages, fio default")
    print(f"| {rw} {bs} | {pages} | {med(every('fio', 0)):.1f} | {med(every('tidemark', 0)):.1f} "
          f"| {med(every('fio', 1)):.0f} | {med(every('tidemark', 1)):.0f} "
          f"| {med(every('fio', 2)):.0f} | {med(every('tidemark', 2)):.0f} "
          f"| {med(every('fio', 3)):.2f} | {med(every('tidemark', 3)):.2f} "
          f"| {ratio:.3f} | {ratios[0]:.2f}-{ratios[-1]:.2f} | {verdict} |")
count = len(next(iter(runs.values())))
print(f"\n{count} ABBA samples per workload (4 runs of each tool pair); "
      "ratio = tidemark MB/s / fio MB/s within a sample.")
sys.exit(1 if failed else 0)
EOF
