#!/usr/bin/env bash
# NBD server throughput, side by side with the peers, in one run (issue 3 point 9).
#
# Reads: nbdcopy copies a page-cached file (2 GiB by default) from each server to `null:`.
# Writes: nbdcopy copies that file into a fresh writable export of each server and flushes
# (--flush: the servers fdatasync, so the figure includes getting the data to disk).
# Servers, all over Unix sockets: `tidemark export`, nbdkit's file plugin, qemu-nbd,
# nbd-server. Every round runs each server once, in a rotating order that runs backwards
# in odd rounds, so no server always follows the same neighbour (paired runs); after every
# run the target file is removed and `sync` waits for the disk to settle (this mount's
# online discard of the freed blocks, the last writeback), so no run pays for the one
# before it. The figure per server is the median over rounds; ratios are tidemark / peer
# (>1 = faster).
#
# Usage: bash benches/nbd-peers.sh [SIZE_MIB] [ROUNDS]      (defaults: 2048 5)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp),
# BEFORE_BIN (optional: another tidemark binary, e.g. a build of main, run as the server
# "before" in the same rounds, so a change is measured before and after in one run).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/nbdcopy-common.sh
size_mib=${1:-2048}
rounds=${2:-5}
setup nbd-peers nbdcopy nbdkit qemu-nbd nbd-server

# start NAME MODE FILE: starts the server on $work/NAME.sock, sets $server_pid.
start() {
    local name=$1 mode=$2 file=$3 sock=$work/$1.sock ro=()
    rm -f "$sock"
    case $name in
    tidemark | before)
        [ "$mode" = read ] && ro=(--read-only)
        local server_bin=$bin
        [ "$name" = before ] && server_bin=$BEFORE_BIN
        "$server_bin" export "$file" "${ro[@]}" --socket "$sock" >/dev/null &
        ;;
    nbdkit)
        [ "$mode" = read ] && ro=(-r)
        nbdkit -f -U "$sock" "${ro[@]}" file "file=$file" &
        ;;
    qemu-nbd)
        [ "$mode" = read ] && ro=(-r)
        qemu-nbd -f raw -t -e 16 "${ro[@]}" --cache=writeback --aio=threads -k "$sock" "$file" &
        ;;
    nbd-server)
        local ro_flag=false
        [ "$mode" = read ] && ro_flag=true
        cat >"$work/nbd-server.conf" <<EOF
[generic]
    unixsock = $sock
    allowlist = true
[default]
    exportname = $file
    readonly = $ro_flag
    flush = true
    fua = true
    trim = true
    multifile = false
EOF
        rm -f "$work/nbd-server.pid"
        # It daemonizes: its pid comes from the pid file.
        nbd-server -C "$work/nbd-server.conf" -p "$work/nbd-server.pid" >/dev/null 2>&1
        for _ in $(seq 100); do [ -s "$work/nbd-server.pid" ] && break; sleep 0.05; done
        ;;
    esac
    if [ "$name" = nbd-server ]; then server_pid=$(cat "$work/nbd-server.pid"); else server_pid=$!; fi
    pids+=("$server_pid")
    for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
    echo "$name did not start" >&2
    return 1
}

uri() {
    if [ "$1" = nbd-server ]; then echo "nbd+unix:///default?socket=$work/$1.sock"; else echo "nbd+unix:///?socket=$work/$1.sock"; fi
}

servers=(tidemark nbdkit qemu-nbd nbd-server)
[ -n "${BEFORE_BIN:-}" ] && servers+=(before)
declare -A results
for ((round = 0; round < rounds; round++)); do
    for s in $(round_order "$round" "${servers[@]}"); do
        start "$s" read "$src"
        tr=$(timed "$(uri "$s")" null:)
        stop
        results[$s.read]+="$tr "
        timed_write "$s"
        t=$write_secs
        results[$s.write]+="$t "
        echo "round $((round + 1))/$rounds: $s done (read ${tr}s, write ${t}s)"
    done
done

mb=$((size_mib * 1048576))
printf '\n%-11s %12s %12s   (median of %d paired runs, %d MiB, MB/s = 10^6 B/s)\n' server "read MB/s" "write MB/s" "$rounds" "$size_mib"
declare -A rate
for s in "${servers[@]}"; do
    for op in read write; do
        rate[$s.$op]=$(rate_mbps "$mb" "${results[$s.$op]}")
    done
    printf '%-11s %12.0f %12.0f\n' "$s" "${rate[$s.read]}" "${rate[$s.write]}"
done
echo
for s in "${servers[@]:1}"; do
    printf 'tidemark / %-10s read %.2fx  write %.2fx\n' "$s" \
        "$(awk -v a="${rate[tidemark.read]}" -v b="${rate[$s.read]}" 'BEGIN { print a / b }')" \
        "$(awk -v a="${rate[tidemark.write]}" -v b="${rate[$s.write]}" 'BEGIN { print a / b }')"
done
