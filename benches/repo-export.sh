#!/usr/bin/env bash
# Issue 18's `repo export` goal, alone and quick: nbdcopy reading `tidemark repo export` of a
# point in a directory repository against nbdcopy reading `tidemark export` of the restored
# image (goal: >= 0.5x of its speed), in one run.
#
#   bash benches/repo-export.sh [SIZE_MIB]      (default 1024; needs root to drop caches)
#
# An image of SIZE_MIB (half random data, half zeros, alternating MiB, as repo-peers.sh
# makes it) is served by `tidemark export` and stored with `tidemark pull --full --repo` into
# a new directory repository (4 MiB chunks), then restored (`repo restore`, holes stay holes).
# Each round reads, in turn: the point through this build's `repo export`, through
# BEFORE_BIN's (optional: an earlier tidemark, e.g. main's), and the restored image through
# `tidemark export --read-only`; each read is `nbdcopy URI null:` with the page cache dropped
# first (sync; echo 3 > /proc/sys/vm/drop_caches). WARM=1 adds reads of each build's export
# with the repository's files already in the page cache (is the page cache the cost?).
# Reported per reader: the median wall time of REPS rounds (default 3), the median CPU of
# the server process (user + system, from /proc/PID/stat) and of nbdcopy, the load average
# at the start of each read, and the ratio against the restored image's median.
# REPO_HASH=sha256 makes the repository with SHA-256 ids (the default is BLAKE3), to tell the
# hash's share from the zero runs'. BEFORE_BIN must read this build's repository: a tidemark
# before session 11 reads neither BLAKE3 repositories nor version 3 point indexes.
# Env: BENCH_DIR (default /var/tmp/tidemark-export-bench), TIDEMARK_BIN, BEFORE_BIN, REPS, WARM,
# REPO_HASH.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
DIR=${BENCH_DIR:-/var/tmp/tidemark-export-bench}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
BEFORE=${BEFORE_BIN:-}
REPS=${REPS:-3}
WARM=${WARM:-0}
[ "$(id -u)" = 0 ] || { echo "run as root: timed reads drop the page cache" >&2; exit 2; }
command -v nbdcopy >/dev/null || { echo "missing nbdcopy (bash scripts/install-deps.sh)" >&2; exit 2; }
[ -x "$BIN" ] || cargo build --release -q -p tidemark
. benches/repo-common.sh
repo_scratch
# CPU seconds a process has used so far: "TOTAL USER SYSTEM".
cpu_of() { python3 -c "import os, sys; f = open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')', 1)[1].split(); t = os.sysconf('SC_CLK_TCK'); u, s = int(f[11]) / t, int(f[12]) / t; print(f'{u + s:.2f} {u:.2f} {s:.2f}')" "$1"; }

IMG=$DIR/vm.raw
make_image "$IMG" "$SIZE_MIB"
"$BIN" export "$IMG" --read-only --socket "$DIR/src.sock" --name vm >"$DIR/src.log" 2>&1 & PIDS+=($!)
wait_socket "$DIR/src.sock"
REPO=$DIR/repo
"$BIN" repo init "$REPO" ${REPO_HASH:+--hash "$REPO_HASH"} >/dev/null
"$BIN" pull --full "nbd+unix:///vm?socket=$DIR/src.sock" --repo "$REPO" --volume vm \
    --volume-uuid 6f1c3e0a-8d9b-4c1e-9f57-2a8b7c6d5e4f --checkpoint c1 >/dev/null
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()
RESTORED=$DIR/restored.raw
"$BIN" repo restore "$REPO" vm@c1 --into "$RESTORED" >/dev/null
cmp "$IMG" "$RESTORED"
rm -f "$IMG"

declare -A WALL SERVER CLIENT LOADS
# read KEY COLD(1|0) NAME SERVER...: serve with SERVER... on a fresh socket, nbdcopy it to null:.
read_once() {
    local key=$1 cold=$2 name=$3; shift 3
    local sock=$DIR/x.sock
    rm -f "$sock"
    "$@" --socket "$sock" >/dev/null 2>"$DIR/$key.log" & local pid=$!
    wait_socket "$sock"
    if [ "$cold" = 1 ]; then drop; else cat "$REPO"/data/*/* >/dev/null; fi
    local l; l=$(load)
    local out
    out=$(python3 - "nbd+unix:///$name?socket=$sock" <<'PY'
import resource, subprocess, sys, time
t0 = time.monotonic()
subprocess.run(["nbdcopy", sys.argv[1], "null:"], check=True)
wall = time.monotonic() - t0
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{wall:.3f} {r.ru_utime + r.ru_stime:.3f}")
PY
)
    local cpu; cpu=($(cpu_of "$pid"))
    kill "$pid"; wait "$pid" 2>/dev/null || true
    WALL[$key]+=" ${out% *}"; CLIENT[$key]+=" ${out#* }"; SERVER[$key]+=" ${cpu[0]}"; LOADS[$key]+=" $l"
    local fetched; fetched=$(grep -o '[0-9]* chunks fetched' "$DIR/$key.log" | tail -1 || true)
    echo "  $key: ${out% *} s, server CPU ${cpu[0]} s (user ${cpu[1]}, system ${cpu[2]}), nbdcopy CPU ${out#* } s (load $l)${fetched:+; $fetched}" >&2
}

KEYS=(repo-export)
[ -z "$BEFORE" ] || KEYS+=(before-repo-export)
[ "$WARM" = 1 ] && KEYS+=(repo-export-warm)
[ "$WARM" = 1 ] && [ -n "$BEFORE" ] && KEYS+=(before-repo-export-warm)
KEYS+=(image-export)
for round in $(seq 1 "$REPS"); do
    read_once repo-export 1 vm@c1 "$BIN" repo export "$REPO" vm@c1
    [ -z "$BEFORE" ] || read_once before-repo-export 1 vm@c1 "$BEFORE" repo export "$REPO" vm@c1
    if [ "$WARM" = 1 ]; then
        read_once repo-export-warm 0 vm@c1 "$BIN" repo export "$REPO" vm@c1
        [ -z "$BEFORE" ] || read_once before-repo-export-warm 0 vm@c1 "$BEFORE" repo export "$REPO" vm@c1
    fi
    read_once image-export 1 img "$BIN" export "$RESTORED" --read-only --name img
    echo "  round $round done" >&2
done

image=$(median ${WALL[image-export]})
echo "repo-export: ${SIZE_MIB} MiB point (half random, half zero per MiB), 4 MiB chunks, directory repository, $(nproc) CPUs, $REPS rounds"
echo "this build: $BIN${BEFORE:+; BEFORE_BIN: $BEFORE}"
echo
echo "| reader (nbdcopy to null:) | wall per round (median) | server CPU (median) | nbdcopy CPU (median) | load per round | speed vs the restored image |"
echo "|---|---|---|---|---|---|"
for key in "${KEYS[@]}"; do
    w=$(median ${WALL[$key]})
    printf '| %s | %s s (%s) | %s s | %s s | %s | %s |\n' "$key" "$(echo ${WALL[$key]} | sed 's/ /, /g')" "$w" \
        "$(median ${SERVER[$key]})" "$(median ${CLIENT[$key]})" "$(echo ${LOADS[$key]} | sed 's/ /, /g')" \
        "$(python3 -c "print(f'{$image / $w:.2f}x')")"
done
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
