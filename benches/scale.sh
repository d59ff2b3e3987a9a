#!/usr/bin/env bash
# Many volumes in one daemon (issue 21, item 3): create N sparse volumes of SIZE each, then
# restart the daemon and measure what a host with that many volumes pays: time from start
# to an answered `info`, resident memory, open file descriptors against the limit, and
# `tidemark info --json` (medians of 5).
#
# The volumes are created once with TIDEMARK_BIN; the measurements then run with each
# binary to compare (BEFORE_BIN, e.g. a build of main, then TIDEMARK_BIN) on that same
# state dir, in one run. `info --json` is timed with the same binary as the daemon.
#
# Usage: benches/scale.sh [N (10000)] [SIZE (16G)]
#   env TIDEMARK_BIN (default target/release/tidemark), BEFORE_BIN (optional: the binary
#   to compare with), SCALE_DIR (default a new dir in /var/tmp, removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
size=${2:-16G}
bin=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
[[ -x $bin ]] || { echo "scale: build first: cargo build --release -p tidemark" >&2; exit 1; }
before=${BEFORE_BIN:-}
[[ -z $before || -x $before ]] || { echo "scale: BEFORE_BIN $before is not executable" >&2; exit 1; }
# The binaries measured, as "label=path".
runs=()
[[ -n $before ]] && runs+=("before=$before")
runs+=("after=$bin")
dir=${SCALE_DIR:-$(mktemp -d /var/tmp/tidemark-scale.XXXXXX)}
state=$dir/state ctl=$dir/ctl.sock nbd=$dir/nbd.sock
mkdir -p "$state" "$dir/img"
chmod 700 "$state"
pid=
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    [[ -z ${SCALE_DIR:-} ]] && rm -rf "$dir"
}
trap cleanup EXIT

start_daemon() { # [binary]
    local t0=$EPOCHREALTIME daemon_bin=${1:-$bin}
    "$daemon_bin" serve --state-dir "$state" --control "$ctl" --socket "$nbd" 2>"$dir/serve.log" &
    pid=$!
    until "$bin" info --control "$ctl" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || { echo "scale: the daemon died:" >&2; tail -5 "$dir/serve.log" >&2; exit 1; }
        sleep 0.01
    done
    started_ms=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
}
stop_daemon() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

# A kept SCALE_DIR that holds the volumes already is measured as it is.
existing=$(find "$state/volumes" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)
if ((existing != n)); then
start_daemon
# Creating N volumes through the CLI would time process start-up, not the daemon: one
# control connection sends every volume-create.
/usr/bin/python3 - "$ctl" "$dir/img" "$n" "$size" <<'PY'
import json, socket, sys
ctl, img, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
size = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
s = socket.socket(socket.AF_UNIX)
s.connect(ctl)
f = s.makefile("rwb")
f.readline()  # greeting
for i in range(n):
    req = {"execute": "volume-create", "id": i,
           "arguments": {"name": f"v{i:05}", "backing": f"{img}/v{i:05}.raw", "size": size}}
    f.write(json.dumps(req).encode() + b"\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if reply.get("id") == i:
            break
    if "error" in reply:
        sys.exit(f"volume-create v{i:05}: {reply['error']['desc']}")
PY
stop_daemon
fi

printf '| binary | volumes | size | start | RSS after start | peak RSS | fds (limit) | info --json, median of 5 (all) | load |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for run in "${runs[@]}"; do
    label=${run%%=*} path=${run#*=}
    start_daemon "$path"
    rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    fds=$(ls "/proc/$pid/fd" | wc -l)
    fd_limit=$(awk '/Max open files/ {print $4}' "/proc/$pid/limits")
    info_ms=()
    for _ in 1 2 3 4 5; do
        t0=$EPOCHREALTIME
        "$path" info --control "$ctl" --json >"$dir/info.json"
        info_ms+=("$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 1000 }')")
    done
    info_median=$(printf '%s\n' "${info_ms[@]}" | sort -n | sed -n 3p)
    volumes=$(jq '.volumes | length' "$dir/info.json")
    hwm_kib=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    stop_daemon
    printf '| %s | %s (info lists %s) | %s | %s ms | %s MiB | %s MiB | %s (%s) | %s ms (%s) | %s |\n' \
        "$label" "$n" "$volumes" "$size" "$started_ms" $((rss_kib / 1024)) $((hwm_kib / 1024)) \
        "$fds" "$fd_limit" "$info_median" "${info_ms[*]}" "$(cut -d' ' -f1 /proc/loadavg)"
done
