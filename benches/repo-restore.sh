#!/usr/bin/env bash
# Issue 18's restore from S3, measured on its own: `tidemark repo restore` against
# `restic restore` of the same image, from a directory and from SeaweedFS (`weed mini` on
# 127.0.0.1), with where the time goes (client CPU, SeaweedFS's CPU, how busy the CPUs are).
#
#   bash benches/repo-restore.sh [SIZE_MIB]      (default 2048; needs root to drop caches)
#
# A daemon volume of SIZE_MIB (half random data, half zeros, alternating MiB, as
# repo-peers.sh) gets a full point c0, then INCREMENTALS more (default 5), each after 1% of
# the volume was rewritten in scattered 64 KiB random writes through the live NBD export
# (python3-libnbd); tidemark pulls each into a directory repository and into SeaweedFS's
# bucket, restic backs the image up to a directory and to the same bucket after each. Then,
# REPS rounds (default 3), each restores the full point (c0: restic's first snapshot) and the
# last one (tidemark's chunks with pieces over them from five incrementals: restic's latest
# snapshot) from each repository, the order rotating every round, the page cache dropped
# (sync; echo 3 > /proc/sys/vm/drop_caches) before each. Every run prints its wall time, the
# restoring program's CPU (user + system), the `weed` process's CPU over the same interval,
# how busy both CPUs were (/proc/stat) and the load average at its start; the table reports
# medians and the ratios against restic in the same run. Every restore is compared with its
# image (cmp) in the first round.
# Env: BENCH_DIR (default /var/tmp/tidemark-restore-bench), TIDEMARK_BIN, REPS (default 3),
# INCREMENTALS (default 5), BEFORE_BIN (optional: an earlier tidemark that also restores both
# tidemark repositories, for before/after rows).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-2048}
DIR=${BENCH_DIR:-/var/tmp/tidemark-restore-bench}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
BEFORE=${BEFORE_BIN:-}
REPS=${REPS:-3}
[ "$(id -u)" = 0 ] || { echo "run as root: timed steps drop the page cache" >&2; exit 2; }
for tool in restic weed python3 /usr/bin/python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (bash scripts/install-deps.sh)" >&2; exit 2; }
done
[ -x "$BIN" ] || cargo build --release -q --locked -p tidemark
. benches/repo-common.sh
repo_scratch
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }

IMG=$DIR/vm.raw
make_image "$IMG" "$SIZE_MIB"

# weed mini binds fixed ports besides the S3 one: one server at a time on this machine, under
# the lock the test suite's SeaweedFS takes too (held until this script and its children end).
exec 9>/tmp/tidemark-tests-weed-mini.lock
flock 9
weed_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$DIR/weed"
AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S S3_BUCKET=bkt weed mini -dir="$DIR/weed" -ip=127.0.0.1 \
    -ip.bind=127.0.0.1 -s3.port="$weed_port" >"$DIR/weed.log" 2>&1 & PIDS+=($!)
WEED_PID=$!
export AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S AWS_REGION=us-east-1
EP=http://127.0.0.1:$weed_port
for _ in $(seq 120); do "$BIN" repo init s3://bkt/probe --s3-endpoint "$EP" >/dev/null 2>&1 && break; sleep 0.5; done
export RESTIC_PASSWORD=bench

TM_DIR=$DIR/tm-repo
TM_S3=s3://bkt/tm
RESTIC_DIR=$DIR/restic-repo
RESTIC_S3=s3:$EP/bkt/restic
"$BIN" repo init "$TM_DIR" >/dev/null
"$BIN" repo init "$TM_S3" --s3-endpoint "$EP" >/dev/null
restic init -q -r "$RESTIC_DIR"
restic init -q -r "$RESTIC_S3"

INCREMENTALS=${INCREMENTALS:-5}
echo "restore benchmark: ${SIZE_MIB} MiB volume (half random, half zero), a full point and $INCREMENTALS incrementals, $(nproc) CPUs"
STATE=$DIR/state
"$BIN" serve --state-dir "$STATE" >"$DIR/daemon.log" 2>&1 & PIDS+=($!)
wait_socket "$STATE/control.sock"
tm() { "$BIN" "$@" --state-dir "$STATE"; }
tm volume create vm --backing "$IMG" >/dev/null
SIZE=$((SIZE_MIB << 20))
backup_uri() { tm backup begin vm "$@" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["volumes"][0]["uri"]["unix"])'; }
# 1% of the volume in scattered 64 KiB random writes through the live export.
change() { change_volume "nbd+unix:///vm?socket=$STATE/nbd.sock" "$SIZE" "$1"; }
for round in $(seq 0 "$INCREMENTALS"); do
    begin=(--checkpoint "c$round"); pull=(--full)
    if [ "$round" -gt 0 ]; then
        change "$round"
        begin+=(--incremental "c$((round - 1))"); pull=(--bitmap "c$((round - 1))")
    fi
    uri=$(backup_uri "${begin[@]}")
    "$BIN" pull "$uri" "${pull[@]}" --repo "$TM_DIR" --checkpoint "c$round" >/dev/null
    "$BIN" pull "$uri" "${pull[@]}" --repo "$TM_S3" --checkpoint "c$round" --s3-endpoint "$EP" >/dev/null
    tm backup end vm >/dev/null
    restic backup -q -r "$RESTIC_DIR" "$IMG"
    restic backup -q -r "$RESTIC_S3" "$IMG"
    [ "$round" -gt 0 ] || cp --sparse=always "$IMG" "$DIR/first.raw"
    echo "  point c$round stored (load $(load))"
done
LAST=c$INCREMENTALS
FIRST_SNAP=$(restic snapshots -q -r "$RESTIC_DIR" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["short_id"])')
FIRST_SNAP_S3=$(restic snapshots -q -r "$RESTIC_S3" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["short_id"])')
echo "  repositories: tidemark $(du -sb "$TM_DIR" | cut -f1) bytes, restic $(du -sb "$RESTIC_DIR" | cut -f1) bytes"

# measure KEY CMD...: drop the page cache, run CMD, and append to $DIR/runs one line:
# KEY wall cpu weed_cpu busy load (seconds; busy = share of all CPUs not idle, 0..1).
measure() {
    local key=$1; shift
    sync; echo 3 >/proc/sys/vm/drop_caches
    python3 - "$key" "$WEED_PID" "$@" >>"$DIR/runs" <<'PY'
import os, subprocess, sys, time
key, weed = sys.argv[1], sys.argv[2]
tick = os.sysconf("SC_CLK_TCK")
def weed_cpu():
    f = open(f"/proc/{weed}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def cpu_times():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f), f[3] + f[4]
load = open("/proc/loadavg").read().split()[0]
w0, (t0, i0), start = weed_cpu(), cpu_times(), time.monotonic()
child = subprocess.Popen(sys.argv[3:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
wall = time.monotonic() - start
w1, (t1, i1) = weed_cpu(), cpu_times()
if status != 0:
    sys.exit(f"{key}: {sys.argv[3:]} failed ({status})")
busy = 1 - (i1 - i0) / max(1, t1 - t0)
print(f"{key} {wall:.3f} {usage.ru_utime + usage.ru_stime:.3f} {w1 - w0:.3f} {busy:.2f} {load}")
PY
    tail -n1 "$DIR/runs" | awk '{printf "  %-16s %6.2f s wall, CPU %5.2f s, weed %5.2f s, CPUs busy %3.0f%%, load %s\n", $1, $2, $3, $4, $5 * 100, $6}'
}

S3=(--s3-endpoint "$EP")
restore_one() { # KEY ROUND: KEY is KIND-full or KIND-last
    local out=$DIR/out.img pt snap snap_s3 want
    case $1 in
        *-full) pt=c0; snap=$FIRST_SNAP; snap_s3=$FIRST_SNAP_S3; want=$DIR/first.raw ;;
        *) pt=$LAST; snap=latest; snap_s3=latest; want=$IMG ;;
    esac
    rm -rf "$out" "$DIR/restic-out"
    case $1 in
        tm-dir-*) measure "$1" "$BIN" repo restore "$TM_DIR" "vm@$pt" --into "$out" ;;
        tm-s3-*) measure "$1" "$BIN" repo restore "$TM_S3" "vm@$pt" --into "$out" "${S3[@]}" ;;
        before-dir-*) measure "$1" "$BEFORE" repo restore "$TM_DIR" "vm@$pt" --into "$out" ;;
        before-s3-*) measure "$1" "$BEFORE" repo restore "$TM_S3" "vm@$pt" --into "$out" "${S3[@]}" ;;
        restic-dir-*) measure "$1" restic restore -q -r "$RESTIC_DIR" "$snap" --target "$DIR/restic-out"; out=$DIR/restic-out$IMG ;;
        restic-s3-*) measure "$1" restic restore -q -r "$RESTIC_S3" "$snap_s3" --target "$DIR/restic-out"; out=$DIR/restic-out$IMG ;;
    esac
    if [ "$2" = 1 ]; then cmp "$out" "$want" || { echo "$1: the restored image differs" >&2; exit 1; }; fi
    rm -rf "$DIR/out.img" "$DIR/restic-out"
}
KEYS=()
for kind in tm-s3 restic-s3 tm-dir restic-dir ${BEFORE:+before-s3 before-dir}; do KEYS+=("$kind-full" "$kind-last"); done
: >"$DIR/runs"
for round in $(seq 1 "$REPS"); do
    n=${#KEYS[@]}
    for ((k = 0; k < n; k++)); do restore_one "${KEYS[(k + round - 1) % n]}" "$round"; done
    echo "  round $round done"
done

col() { awk -v k="$1" -v c="$2" '$1 == k { print $c }' "$DIR/runs"; }
med() { median $(col "$1" "$2"); }
loads() { col "$1" 6 | paste -sd/; }
echo
echo "| restore (${SIZE_MIB} MiB, medians of $REPS) | wall | client CPU | weed CPU | CPUs busy | loads |"
echo "|---|---|---|---|---|---|"
for key in "${KEYS[@]}"; do
    printf '| %s | %s s | %s s | %s s | %s | %s |\n' "$key" "$(med "$key" 2)" "$(med "$key" 3)" \
        "$(med "$key" 4)" "$(med "$key" 5)" "$(loads "$key")"
done
echo
echo "| ratio (speed: peer time / tidemark time) | full point (c0) | after $INCREMENTALS incrementals ($LAST) |"
echo "|---|---|---|"
both() { printf '| %s | %s | %s |\n' "$1" "$(ratio "$(med "$2-full" 2)" "$(med "$3-full" 2)")" "$(ratio "$(med "$2-last" 2)" "$(med "$3-last" 2)")"; }
both "tidemark vs restic, S3" restic-s3 tm-s3
both "tidemark vs restic, directory" restic-dir tm-dir
both "tidemark's S3 time / its directory time" tm-s3 tm-dir
both "restic's S3 time / its directory time" restic-s3 restic-dir
if [ -n "$BEFORE" ]; then
    both "S3: this build vs BEFORE_BIN" before-s3 tm-s3
    both "directory: this build vs BEFORE_BIN" before-dir tm-dir
fi
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
