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
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
rounds=${2:-5}
bin=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
if [ ! -x "$bin" ]; then cargo build --release -p tidemark; fi
for tool in nbdcopy nbdkit qemu-nbd nbd-server; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-deps.sh" >&2; exit 1; }
done

work=$(mktemp -d "${BENCH_DIR:-/tmp}/nbd-peers.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

src=$work/source.img
echo "preparing a ${size_mib} MiB source file in $work"
head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$src"
cat "$src" >/dev/null # page-cache it
sync                  # and let its writeback finish before the first run

# start NAME MODE FILE: starts the server on $work/NAME.sock, sets $server_pid.
start() {
    local name=$1 mode=$2 file=$3 sock=$work/$1.sock ro=()
    rm -f "$sock"
    case $name in
    tidemark)
        [ "$mode" = read ] && ro=(--read-only)
        "$bin" export "$file" "${ro[@]}" --socket "$sock" >/dev/null &
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

stop() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    while kill -0 "$server_pid" 2>/dev/null; do sleep 0.05; done
}

uri() {
    if [ "$1" = nbd-server ]; then echo "nbd+unix:///default?socket=$work/$1.sock"; else echo "nbd+unix:///?socket=$work/$1.sock"; fi
}

# seconds of one nbdcopy run
timed() {
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "$@"
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

servers=(tidemark nbdkit qemu-nbd nbd-server)
declare -A results
for ((round = 0; round < rounds; round++)); do
    n=${#servers[@]}
    for ((i = 0; i < n; i++)); do
        if ((round % 2)); then
            s=${servers[$(((n - 1 - i + round) % n))]}
        else
            s=${servers[$(((i + round) % n))]}
        fi
        start "$s" read "$src"
        tr=$(timed "$(uri "$s")" null:)
        stop
        results[$s.read]+="$tr "
        dst=$work/target.img
        rm -f "$dst"
        truncate -s $((size_mib * 1024 * 1024)) "$dst"
        start "$s" write "$dst"
        t=$(timed --flush "$src" "$(uri "$s")")
        stop
        results[$s.write]+="$t "
        rm -f "$dst"
        sync
        echo "round $((round + 1))/$rounds: $s done (read ${tr}s, write ${t}s)"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mb=$((size_mib * 1048576))
printf '\n%-11s %12s %12s   (median of %d paired runs, %d MiB, MB/s = 10^6 B/s)\n' server "read MB/s" "write MB/s" "$rounds" "$size_mib"
declare -A rate
for s in "${servers[@]}"; do
    for op in read write; do
        m=$(echo "${results[$s.$op]}" | median)
        rate[$s.$op]=$(awk -v b="$mb" -v t="$m" 'BEGIN { printf "%.3f", b / t / 1e6 }')
    done
    printf '%-11s %12.0f %12.0f\n' "$s" "${rate[$s.read]}" "${rate[$s.write]}"
done
echo
for s in nbdkit qemu-nbd nbd-server; do
    printf 'tidemark / %-10s read %.2fx  write %.2fx\n' "$s" \
        "$(awk -v a="${rate[tidemark.read]}" -v b="${rate[$s.read]}" 'BEGIN { print a / b }')" \
        "$(awk -v a="${rate[tidemark.write]}" -v b="${rate[$s.write]}" 'BEGIN { print a / b }')"
done
