#!/usr/bin/env bash
# `tidemark bench` measuring NBD servers side by side: tidemark export, qemu-nbd, nbdkit
# (file plugin) and nbd-server, all serving the same file on the main disk over Unix
# sockets, with the same workloads. The file is laid out with data and read once first, so
# every server starts from the same (warm) page cache: the comparison is of the servers
# and the protocol path, not of the disk. Each run measures every server once, in an order
# that rotates from run to run; figures are medians over --runs, ratios are tidemark export
# / peer.
#
# Usage: benches/bench-nbd.sh [--runs N] [--time SECONDS] [--size SIZE]
#   env TIDEMARK_BIN: the binary (default: target/release/tidemark, built); BENCH_RUNS: --runs.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BENCH_RUNS:-5}
seconds=3
size=1G
while (($#)); do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --time) seconds=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "bench-nbd: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ -z "${TIDEMARK_BIN:-}" ]]; then
    cargo build --release --quiet -p tidemark
    TIDEMARK_BIN=$PWD/target/release/tidemark
fi

work=$(mktemp -d /var/tmp/tidemark-bench-nbd.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
file=$work/disk.img
"$TIDEMARK_BIN" bench --rw write --bs 1M --direct --size "$size" --json "$file" >/dev/null
cat "$file" >/dev/null

wait_for_socket() {
    for _ in $(seq 200); do [[ -S "$1" ]] && return 0; sleep 0.05; done
    echo "bench-nbd: no socket $1 after 10 s" >&2
    exit 2
}

"$TIDEMARK_BIN" export "$file" --socket "$work/tidemark.sock" --name bench >/dev/null &
pids+=($!)
qemu-nbd -f raw -x bench -k "$work/qemu-nbd.sock" --shared=16 -t "$file" &
pids+=($!)
nbdkit -f -U "$work/nbdkit.sock" -e bench file "$file" &
pids+=($!)
cat >"$work/nbd-server.conf" <<EOF
[generic]
unixsock = $work/nbd-server.sock
listenaddr = 127.0.0.1
port = $((20000 + RANDOM % 20000))
[bench]
exportname = $file
EOF
# nbd-server's foreground mode (-d) serves one connection and exits; let it daemonize and
# find it by its pid file.
nbd-server -C "$work/nbd-server.conf" -p "$work/nbd-server.pid" 2>/dev/null
servers=(tidemark qemu-nbd nbdkit nbd-server)
for server in "${servers[@]}"; do wait_for_socket "$work/$server.sock"; done
for _ in $(seq 100); do [[ -s "$work/nbd-server.pid" ]] && break; sleep 0.05; done
pids+=("$(cat "$work/nbd-server.pid")")

workloads=("read 256K 16" "write 256K 16" "randread 4K 32" "randwrite 4K 32")
results=$work/results.tsv
: >"$results"
echo "bench-nbd: $runs runs of ${seconds}s per server and workload on $size" >&2
for workload in "${workloads[@]}"; do
    read -r rw bs qd <<<"$workload"
    for ((run = 0; run < runs; run++)); do
        for ((i = 0; i < ${#servers[@]}; i++)); do
            server=${servers[$(((i + run) % ${#servers[@]}))]}
            out=$work/$server-$rw-$run.json
            if "$TIDEMARK_BIN" bench --rw "$rw" --bs "$bs" --qd "$qd" --time "$seconds" --force \
                --json "nbd+unix:///bench?socket=$work/$server.sock" >"$out" 2>"$out.err"; then
                printf '%s\t%s\t%s\t%s\t%s\n' "$rw" "$bs" "$qd" "$server" "$out" >>"$results"
            else
                echo "bench-nbd: $server $rw failed: $(tail -1 "$out.err")" >&2
            fi
        done
    done
    echo "  $rw $bs done" >&2
done

python3 - "$results" "${servers[@]}" <<'EOF'
import json, statistics, sys
results, servers = sys.argv[1], sys.argv[2:]
figures = {}
for line in open(results):
    rw, bs, qd, server, path = line.rstrip("\n").split("\t")
    report = json.load(open(path))
    figures.setdefault((rw, bs, qd), {}).setdefault(server, []).append(report["mb_per_sec"])
peers = [s for s in servers if s != "tidemark"]
print("| workload (MB/s, median) | " + " | ".join(servers) + " | " + " | ".join(f"tidemark/{p}" for p in peers) + " |")
print("|---|" + "---:|" * (len(servers) + len(peers)))
for (rw, bs, qd), by_server in figures.items():
    med = {s: statistics.median(v) for s, v in by_server.items()}
    cells = [f"{med[s]:.1f}" if s in med else "failed" for s in servers]
    ratios = [f"{med['tidemark'] / med[p]:.2f}" if "tidemark" in med and p in med else "-" for p in peers]
    print(f"| {rw} {bs} QD{qd} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
EOF
