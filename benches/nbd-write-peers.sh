#!/usr/bin/env bash
# NBD writes into a tracked daemon volume, side by side with the peers, in one run
# (issue 21 item 2).
#
# nbdcopy --flush copies a random source file (2 GiB by default, made once from
# /dev/urandom) into a fresh writable export of each server; every server's target is a
# fresh sparse file of the same size in the same directory (the same filesystem). Before
# each timed step the page cache is dropped and the source read back into it (warm), so
# the copy measures the server and the disk, not the writeback left by the step before.
# Servers, all over Unix sockets:
#   tidemark         `tidemark serve` with the target as a volume and a checkpoint (durable
#                    tracking on: every write marks the dirty bitmap on disk first);
#   tidemark-before  the same with the binary in TIDEMARK_BIN_BEFORE (when set), e.g. the
#                    main branch's, so a change is measured before and after in one run;
#   nbdkit           the file plugin;
#   qemu-nbd-direct  --cache=none --aio=io_uring (O_DIRECT, as tidemark's volumes);
#   qemu-nbd         its defaults (writeback cache, threads);
#   disk             no server: fio writes the same bytes straight into the target file
#                    (O_DIRECT, io_uring, 256 KiB requests as nbdcopy sends, 64 in flight,
#                    fsync at the end), the disk's own limit for this copy.
# Every round runs each server once in a rotating order that runs backwards in odd
# rounds (paired runs). The figure per server is the median over rounds, with the load
# average printed beside each run; ratios are tidemark / peer (> 1 = faster).
#
# Usage: sudo bash benches/nbd-write-peers.sh [SIZE_MIB] [ROUNDS]      (defaults: 2048 3)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing),
#      TIDEMARK_BIN_BEFORE (optional second binary), BENCH_DIR (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/nbdcopy-common.sh
size_mib=${1:-2048}
rounds=${2:-3}
[ -w /proc/sys/vm/drop_caches ] || { echo "dropping caches needs root" >&2; exit 1; }
setup nbd-write-peers nbdcopy nbdkit qemu-nbd
load() { uptime | sed 's/.*load average: //'; }

# start NAME FILE: starts server NAME writing FILE on $work/NAME.sock, sets $server_pid.
start() {
    local name=$1 file=$2 sock=$work/$1.sock
    rm -f "$sock"
    # Durable tracking: a volume with a checkpoint marks each changed block on disk.
    case $name in
    tidemark | tidemark-before)
        local tm=$bin state=$work/state-$name
        [ "$name" = tidemark-before ] && tm=$TIDEMARK_BIN_BEFORE
        rm -rf "$state"
        mkdir -m 700 "$state"
        "$tm" serve --state-dir "$state" 2>"$work/$name.log" &
        server_pid=$!
        pids+=("$server_pid")
        for _ in $(seq 200); do [ -S "$state/control.sock" ] && break; sleep 0.05; done
        "$tm" volume create v --backing "$file" --state-dir "$state" >/dev/null
        "$tm" checkpoint create v c0 --state-dir "$state" >/dev/null
        return 0
        ;;
    nbdkit)
        nbdkit -f -U "$sock" file "file=$file" &
        ;;
    qemu-nbd-direct)
        qemu-nbd -f raw -t -e 16 --cache=none --aio=io_uring -k "$sock" "$file" &
        ;;
    qemu-nbd)
        qemu-nbd -f raw -t -e 16 -k "$sock" "$file" &
        ;;
    esac
    server_pid=$!
    pids+=("$server_pid")
    for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
    echo "$name did not start" >&2
    return 1
}

uri() {
    case $1 in
    tidemark*) echo "nbd+unix:///v?socket=$work/state-$1/nbd.sock" ;;
    *) echo "nbd+unix:///?socket=$work/$1.sock" ;;
    esac
}

servers=(tidemark nbdkit qemu-nbd-direct qemu-nbd)
[ -n "${TIDEMARK_BIN_BEFORE:-}" ] && servers=(tidemark tidemark-before nbdkit qemu-nbd-direct qemu-nbd)
command -v fio >/dev/null && servers+=(disk)
# disk_write FILE: fio's copy of the source's size into FILE, timed like nbdcopy (seconds).
disk_write() {
    local t0 t1
    t0=$(date +%s.%N)
    fio --name=disk --filename="$1" --rw=write --bs=256k --iodepth=64 --ioengine=io_uring \
        --direct=1 --size="$bytes" --end_fsync=1 --output=/dev/null
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}
bytes=$((size_mib * 1024 * 1024))
declare -A results loads
for ((round = 0; round < rounds; round++)); do
    for s in $(round_order "$round" "${servers[@]}"); do
        dst=$work/target.img
        rm -f "$dst"
        truncate -s "$bytes" "$dst"
        [ "$s" = disk ] || start "$s" "$dst"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        cat "$src" >/dev/null
        # fio's own start-up (its libraries, cold after the drop) is not the disk's time.
        [ "$s" = disk ] && fio --version >/dev/null
        l=$(load)
        if [ "$s" = disk ]; then
            t=$(disk_write "$dst")
        else
            t=$(timed --flush "$src" "$(uri "$s")")
            stop
        fi
        rm -f "$dst"
        sync
        results[$s]+="$t "
        loads[$s]+="[$l] "
        echo "round $round $s: $(awk -v b="$bytes" -v t="$t" 'BEGIN { printf "%.0f", b / t / 1e6 }') MB/s (load $l)"
    done
done

echo
echo "nbdcopy --flush of ${size_mib} MiB into each server, medians of $rounds (MB/s; load at each run):"
for s in "${servers[@]}"; do
    printf '  %-16s %9s MB/s   loads %s\n' "$s" "$(rate_mbps "$bytes" "${results[$s]}")" "${loads[$s]}"
done
ratio() {
    awk -v a="$(echo "${results[$2]}" | median)" -v b="$(echo "${results[$1]}" | median)" \
        'BEGIN { printf "%.2f", a / b }'
}
echo "ratios (time of the peer / time of tidemark, > 1 = tidemark faster):"
for s in "${servers[@]}"; do
    [ "$s" = tidemark ] && continue
    echo "  tidemark vs $s: $(ratio tidemark "$s")x"
done
if [[ " ${servers[*]} " == *" disk "* ]]; then
    echo "each server against the disk's own limit (fio's time / the server's time):"
    for s in "${servers[@]}"; do
        [ "$s" = disk ] && continue
        echo "  $s: $(ratio "$s" disk)"
    done
fi
