#!/usr/bin/env bash
# Reading a restore point served in place (`tidemark export --chain BASE D1 D2 D3`) against
# reading the image `tidemark restore` makes of it, served by `tidemark export FILE -r`
# (issue 17: goal >= 0.8x). nbdcopy copies each export to null:, cold (page cache dropped
# before the run) and warm (a run right after another one of the same export). Both read the
# same bytes: the point is the restored image (checked with cmp before timing).
#
# The point: a SIZE_MIB base image of random data with 10% holes, then three incremental
# deltas of 1% each (64 KiB-aligned random extents, some zeroed), cut with
# `tidemark delta create`. The chain reads the base image plus the deltas' records
# (zstd-decoded); the flat image is one file sent with sendfile(2).
# Every round runs both exports cold and warm, in an order that flips every round;
# the figure per case is the median over rounds, with the load average beside it.
#
# Usage: bash benches/chain-export.sh [SIZE_MIB] [ROUNDS]      (defaults: 4096 3)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-4096}
rounds=${2:-3}
bin=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
if [ ! -x "$bin" ]; then cargo build --release -p tidemark; fi
command -v nbdcopy >/dev/null || { echo "missing nbdcopy: run scripts/install-deps.sh" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "cold runs drop the page cache: run as root" >&2; exit 1; }

work=$(mktemp -d "${BENCH_DIR:-/tmp}/chain-export.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

size=$((size_mib * 1024 * 1024))
uuid=5a1e0000-0000-4000-8000-00000000be17
vol=$work/vol.img
echo "preparing a ${size_mib} MiB point (base image + 3 deltas) in $work"
head -c "$size" /dev/urandom >"$vol"
# 10% of the base in holes, as a real disk has unused space.
blocks=$((size / 65536))
for i in $(seq 0 10 $((blocks - 1))); do
    fallocate --punch-hole --offset $((i * 65536)) --length 65536 "$vol"
done
cp --sparse=always "$vol" "$work/base.img"
prev=mon
gen=1
for day in tue wed thu; do
    # 1% of the volume changed: random 64 KiB blocks, every fifth one zeroed.
    list=$work/$day.list
    : >"$list"
    for _ in $(seq $((blocks / 100))); do
        b=$((RANDOM * 32768 + RANDOM))
        b=$((b % blocks))
        echo "$((b * 65536)) 65536" >>"$list"
        if ((b % 5 == 0)); then
            dd if=/dev/zero of="$vol" bs=65536 seek="$b" count=1 conv=notrunc status=none
        else
            dd if=/dev/urandom of="$vol" bs=65536 seek="$b" count=1 conv=notrunc status=none
        fi
    done
    "$bin" delta create --from "$vol" --changed "$list" --volume-uuid "$uuid" \
        --from-checkpoint "$prev:$gen" --to-checkpoint "$day:$((gen + 1))" \
        --out "$work/$day.delta" >/dev/null
    prev=$day
    gen=$((gen + 1))
done
chain=("$work/base.img" "$work/tue.delta" "$work/wed.delta" "$work/thu.delta")
"$bin" restore --into "$work/flat.img" "${chain[@]}" >/dev/null
cmp "$work/flat.img" "$vol"
rm -f "$vol"
ls -ls "$work"/*.delta | awk '{printf "  %s: %d MiB\n", $NF, $6 / 1048576}'

# start NAME: serve it on $work/NAME.sock, sets $server_pid.
start() {
    local sock=$work/$1.sock
    rm -f "$sock"
    case $1 in
    chain) "$bin" export --chain "${chain[@]}" --socket "$sock" >/dev/null & ;;
    flat) "$bin" export "$work/flat.img" --read-only --socket "$sock" >/dev/null & ;;
    esac
    server_pid=$!
    pids+=("$server_pid")
    for _ in $(seq 200); do [ -S "$sock" ] && return; sleep 0.05; done
    echo "$1 did not start" >&2
    exit 1
}

stop() {
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
}

# read NAME: seconds for nbdcopy of the export to null:.
read_once() {
    local start end
    start=$(date +%s.%N)
    nbdcopy "nbd+unix:///?socket=$work/$1.sock" null:
    end=$(date +%s.%N)
    echo "$end - $start" | bc
}

declare -A times
for round in $(seq "$rounds"); do
    order=(chain flat)
    ((round % 2 == 0)) && order=(flat chain)
    for name in "${order[@]}"; do
        start "$name"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        cold=$(read_once "$name")
        warm=$(read_once "$name")
        stop
        load=$(cut -d' ' -f1 /proc/loadavg)
        times[$name-cold]+="$cold "
        times[$name-warm]+="$warm "
        printf 'round %d %-5s cold %6.2f s  warm %6.2f s  (load %s)\n' "$round" "$name" "$cold" "$warm" "$load"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "| case | export --chain MB/s | export FILE (restored) MB/s | ratio chain/flat |"
echo "|---|---|---|---|"
for mode in cold warm; do
    c=$(echo "${times[chain-$mode]}" | median)
    f=$(echo "${times[flat-$mode]}" | median)
    printf '| %s | %.0f | %.0f | %.2f |\n' "$mode" \
        "$(echo "$size / $c / 1000000" | bc -l)" "$(echo "$size / $f / 1000000" | bc -l)" \
        "$(echo "$f / $c" | bc -l)"
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); ${size_mib} MiB point, median of $rounds rounds"
