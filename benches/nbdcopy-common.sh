# Shell functions the nbdcopy benches share (benches/nbd-peers.sh, benches/tls-peers.sh);
# sourced, not run.

# stop: stop the server started last ($server_pid) and wait until it is gone.
stop() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    while kill -0 "$server_pid" 2>/dev/null; do sleep 0.05; done
}

# timed ARGS...: seconds of one `nbdcopy ARGS...` run.
timed() {
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "$@"
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

# median: the median of the numbers on stdin (separated by spaces or newlines).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# round_order ROUND NAME...: the servers in the order round ROUND runs them, rotating and
# backwards in odd rounds, so no server always follows the same neighbour (paired runs).
round_order() {
    local round=$1 i
    shift
    local servers=("$@") n=$#
    for ((i = 0; i < n; i++)); do
        if ((round % 2)); then
            echo "${servers[$(((n - 1 - i + round) % n))]}"
        else
            echo "${servers[$(((i + round) % n))]}"
        fi
    done
}

# rate_mbps BYTES SECONDS-LIST: MB/s (10^6 B/s) at the median of the run times.
rate_mbps() {
    awk -v b="$1" -v t="$(echo "$2" | median)" 'BEGIN { printf "%.3f", b / t / 1e6 }'
}

# setup NAME TOOL...: check the tools, build the release binary if missing ($bin), make
# the work dir ($work) and a random page-cached source file of $size_mib MiB ($src); on
# exit, the servers in $pids are killed and the work dir removed.
setup() {
    local name=$1 tool
    shift
    bin=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
    if [ ! -x "$bin" ]; then cargo build --release -p tidemark; fi
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-deps.sh" >&2; exit 1; }
    done
    work=$(mktemp -d "${BENCH_DIR:-/tmp}/$name.XXXXXX")
    pids=()
    trap cleanup EXIT
    src=$work/source.img
    echo "preparing a ${size_mib} MiB source file in $work"
    head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$src"
    cat "$src" >/dev/null # page-cache it
    sync                  # and let its writeback finish before the first run
}

cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}

# timed_write NAME: copy $src into a fresh writable export of server NAME (nbdcopy
# --flush, with the caller's `start` and `uri`); the seconds go to $write_secs. The target
# is removed and `sync` waits for the disk to settle, so no run pays for the one before.
timed_write() {
    local dst=$work/target.img
    rm -f "$dst"
    truncate -s $((size_mib * 1024 * 1024)) "$dst"
    start "$1" write "$dst"
    write_secs=$(timed --flush "$src" "$(uri "$1")")
    stop
    rm -f "$dst"
    sync
}
