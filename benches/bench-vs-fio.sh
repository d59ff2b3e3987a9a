#!/usr/bin/env bash
# Accuracy of `tidemark bench` against fio (Debian's fio, io_uring engine), in one run.
#
# Both tools measure the same file on the main disk with the same workloads (issue 8):
# sequential 1 MiB and random 4 KiB, reads and writes, QD32, O_DIRECT, time-based, writes
# ending with an fsync. Each workload runs as --runs pairs; the order inside a pair
# alternates (fio first, then tidemark first) so drift on this noisy 2-core machine hits
# both alike. Reported: the median MB/s of each tool and the median of the per-pair ratios
# tidemark/fio; a workload passes when that median ratio is within 10% of 1.
#
# Usage: benches/bench-vs-fio.sh [--runs N] [--time SECONDS] [--size SIZE] [--dir DIR]
#   env TIDEMARK_BIN: the binary to measure (default: target/release/tidemark, built);
#   env BENCH_RUNS: default for --runs.
# Exit status: 0 when every workload agrees within 10%, 1 when one does not, 2 on errors.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BENCH_RUNS:-7}
seconds=3
size=2G
dir=/var/tmp
while (($#)); do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --time) seconds=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
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

workloads=("read 1M" "write 1M" "randread 4K" "randwrite 4K")
results=$work/results.tsv
: >"$results"

run_fio() { # rw bs out
    fio --name=bench-vs-fio --filename="$file" --ioengine=io_uring --direct=1 \
        --rw="$1" --bs="$2" --iodepth=32 --size="$size" --time_based --runtime="$seconds" \
        --end_fsync=1 --output-format=json >"$3"
}
run_tidemark() { # rw bs out
    "$TIDEMARK_BIN" bench --rw "$1" --bs "$2" --qd 32 --direct --size "$size" \
        --time "$seconds" --force --json "$file" >"$3"
}

echo "bench-vs-fio: $runs pairs of ${seconds}s runs per workload on $file ($fstype, $size), QD32, O_DIRECT" >&2
for workload in "${workloads[@]}"; do
    read -r rw bs <<<"$workload"
    for ((run = 1; run <= runs; run++)); do
        fio_out=$work/fio-$rw-$run.json
        tm_out=$work/tm-$rw-$run.json
        if ((run % 2)); then
            run_fio "$rw" "$bs" "$fio_out"; run_tidemark "$rw" "$bs" "$tm_out"
        else
            run_tidemark "$rw" "$bs" "$tm_out"; run_fio "$rw" "$bs" "$fio_out"
        fi
        printf '%s\t%s\t%s\t%s\n' "$rw" "$bs" "$fio_out" "$tm_out" >>"$results"
        echo "  $rw $bs pair $run/$runs done" >&2
    done
done

python3 - "$results" <<'EOF'
import json, statistics, sys

def fio_figures(path):
    job = json.load(open(path))["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    return side["bw_bytes"] / 1e6, side["iops"], side["clat_ns"]["percentile"]["50.000000"] / 1e3

def tidemark_figures(path):
    report = json.load(open(path))
    side = report["read"] or report["write"]
    return report["mb_per_sec"], report["iops"], side["latency_ns"]["p50"] / 1e3

rows = {}
for line in open(sys.argv[1]):
    rw, bs, fio_path, tm_path = line.rstrip("\n").split("\t")
    rows.setdefault((rw, bs), []).append((fio_figures(fio_path), tidemark_figures(tm_path)))

print("| workload (QD32, O_DIRECT) | fio MB/s | tidemark MB/s | fio IOPS | tidemark IOPS | fio p50 us | tidemark p50 us | ratio (median of pairs) | within 10% |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
failed = 0
for (rw, bs), pairs in rows.items():
    med = lambda values: statistics.median(values)
    fio_mb = med([f[0] for f, _ in pairs]); tm_mb = med([t[0] for _, t in pairs])
    fio_iops = med([f[1] for f, _ in pairs]); tm_iops = med([t[1] for _, t in pairs])
    fio_p50 = med([f[2] for f, _ in pairs]); tm_p50 = med([t[2] for _, t in pairs])
    ratio = med([t[0] / f[0] for f, t in pairs])
    ok = abs(ratio - 1) <= 0.10
    failed += not ok
    print(f"| {rw} {bs} | {fio_mb:.1f} | {tm_mb:.1f} | {fio_iops:.0f} | {tm_iops:.0f} | {fio_p50:.0f} | {tm_p50:.0f} | {ratio:.3f} | {'yes' if ok else 'NO'} |")
print(f"\n{len(next(iter(rows.values())))} pairs per workload; ratio = tidemark MB/s / fio MB/s.")
sys.exit(1 if failed else 0)
EOF
