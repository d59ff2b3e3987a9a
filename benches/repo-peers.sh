#!/usr/bin/env bash
# Issue 18's benchmark: the backup repository side by side with restic and borg, one run.
#
#   bash benches/repo-peers.sh [SIZE_MIB]      (default 4096; needs root to drop caches)
#
# A daemon volume of SIZE_MIB (half random data, half zeros) gets six points: a full one,
# then five incrementals, each after 1% of the volume was rewritten in scattered 64 KiB
# random writes through the live NBD export (python3-libnbd). tidemark pulls each backup's
# snapshot into a directory repository (default 4 MiB chunks, and again with 64 KiB chunks)
# and into SeaweedFS's S3 (`weed mini` on 127.0.0.1);
# restic backs up the same image file to a directory and to the same bucket, borg to a
# directory. Two more full backups of each kind go into scratch repositories, so full
# backups report the median of three. Then each restores the last point three times, and
# `repo export` of it is read with nbdcopy three times against `tidemark export` of the
# restored image. The page cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches)
# before every timed step. Incrementals report the median of the five, everything else the
# median of three; every line carries the load average at the start of its first run.
# Env: BENCH_DIR (default /var/tmp/tidemark-repo-bench), TIDEMARK_BIN, REPS (default 3: runs of
# each full backup, restore and read, of which the median is reported); BEFORE_BIN (optional):
# an earlier tidemark binary whose six points also go into a directory repository with the
# default chunk size, for a before/after comparison in the same run (incremental time, new
# data stored, repository size); it also restores and `repo export`s the last point of its own
# directory repository, for before/after restore and read rows (each build reads what it wrote:
# a tidemark before session 11 reads neither BLAKE3 repositories nor version 3 point indexes).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-4096}
DIR=${BENCH_DIR:-/var/tmp/tidemark-repo-bench}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
BEFORE=${BEFORE_BIN:-}
REPS=${REPS:-3}
[ "$(id -u)" = 0 ] || { echo "run as root: timed steps drop the page cache" >&2; exit 2; }
for tool in restic borg weed nbdcopy /usr/bin/python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (bash scripts/install-deps.sh)" >&2; exit 2; }
done
[ -x "$BIN" ] || cargo build --release -q -p tidemark
. benches/repo-common.sh
repo_scratch
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
mbps() { python3 -c "print(f'{$1 / 1e6 / $2:.1f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
size_of() { du -sb "$1" | cut -f1; }

IMG=$DIR/vm.raw
make_image "$IMG" "$SIZE_MIB"
STATE=$DIR/state
"$BIN" serve --state-dir "$STATE" >"$DIR/daemon.log" 2>&1 & PIDS+=($!)
wait_socket "$STATE/control.sock"
tm() { "$BIN" "$@" --state-dir "$STATE"; }
tm volume create vm --backing "$IMG" >/dev/null
NBD_SOCK=$STATE/nbd.sock
SIZE=$((SIZE_MIB << 20))

# weed mini binds fixed ports besides the S3 one: one server at a time on this machine, under
# the lock the test suite's SeaweedFS takes too (held until this script and its children end).
exec 9>/tmp/tidemark-tests-weed-mini.lock
flock 9
weed_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$DIR/weed"
AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S S3_BUCKET=bkt weed mini -dir="$DIR/weed" -ip=127.0.0.1 \
    -ip.bind=127.0.0.1 -s3.port="$weed_port" >"$DIR/weed.log" 2>&1 & PIDS+=($!)
export AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S AWS_REGION=us-east-1
EP=http://127.0.0.1:$weed_port
for _ in $(seq 120); do "$BIN" repo init s3://bkt/probe --s3-endpoint "$EP" >/dev/null 2>&1 && break; sleep 0.5; done
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
TM_DIR=$DIR/tm-repo
TM_S3=s3://bkt/tm
TM_SMALL=$DIR/tm-repo-64k   # the smallest chunk size, for the new-data figure
"$BIN" repo init "$TM_DIR" >/dev/null
TM_BEFORE=$DIR/tm-repo-before
[ -z "$BEFORE" ] || "$BEFORE" repo init "$TM_BEFORE" >/dev/null
"$BIN" repo init "$TM_SMALL" --chunk-size 64K >/dev/null
"$BIN" repo init "$TM_S3" --s3-endpoint "$EP" >/dev/null
restic init -q -r "$DIR/restic-repo"
restic init -q -r "s3:$EP/bkt/restic"
borg init -e none "$DIR/borg-repo" >/dev/null

declare -A T L
# timed KEY CMD...: run CMD with a cold page cache; its seconds in T[KEY], the load in L[KEY].
# Each figure is also printed as it is taken (stderr), so a run cut short still reports.
timed() {
    local key=$1; shift; drop; L[$key]=$(load); local t0; t0=$(now); "$@" >/dev/null
    T[$key]=$(secs "$t0" "$(now)"); echo "  $key: ${T[$key]} s (load ${L[$key]})" >&2
}

# med3 KEY: T[KEY] becomes the median of T[KEY], T[KEY.1], ... of the REPS runs (L[KEY] stays
# the first's).
med3() {
    local all=("${T[$1]}") i
    for ((i = 1; i < REPS; i++)); do all+=("${T[$1.$i]}"); done
    T[$1]=$(median "${all[@]}")
}
backup_uri() { tm backup begin vm "$@" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["volumes"][0]["uri"]["unix"])'; }

# 1% of the volume in scattered 64 KiB random writes through the live export.
change() { change_volume "nbd+unix:///vm?socket=$NBD_SOCK" "$SIZE" "$1"; }

echo "repository benchmark: ${SIZE_MIB} MiB volume (half random, half zero), 6 points, $(nproc) CPUs"
# REPS - 1 extra full backups of each kind, into scratch repositories removed afterwards.
for rep in $(seq 1 $((REPS - 1))); do
    S=$DIR/scratch
    "$BIN" repo init "$S-tm" >/dev/null
    "$BIN" repo init "$S-64k" --chunk-size 64K >/dev/null
    "$BIN" repo init "s3://bkt/scratch$rep" --s3-endpoint "$EP" >/dev/null
    uri=$(backup_uri)
    timed "tm-dir-full-0.$rep" "$BIN" pull "$uri" --full --repo "$S-tm" --checkpoint r
    timed "tm-64k-full-0.$rep" "$BIN" pull "$uri" --full --repo "$S-64k" --checkpoint r
    timed "tm-s3-full-0.$rep" "$BIN" pull "$uri" --full --repo "s3://bkt/scratch$rep" --checkpoint r --s3-endpoint "$EP"
    tm backup end vm >/dev/null
    restic init -q -r "$S-restic"
    restic init -q -r "s3:$EP/bkt/scratch-restic$rep"
    borg init -e none "$S-borg" >/dev/null
    timed "restic-dir-full-0.$rep" restic backup -q -r "$S-restic" "$IMG"
    timed "restic-s3-full-0.$rep" restic backup -q -r "s3:$EP/bkt/scratch-restic$rep" "$IMG"
    timed "borg-dir-full-0.$rep" borg create "$S-borg::p" "$IMG"
    rm -rf "$S"-*
    echo "  extra full backups $rep done (load $(load))"
done
for round in 0 1 2 3 4 5; do
    ckpt=c$round
    begin=(backup begin vm --checkpoint "$ckpt"); pull=(--full); kind=full
    if [ "$round" -gt 0 ]; then
        change "$round"
        prev=c$((round - 1)); begin+=(--incremental "$prev"); pull=(--bitmap "$prev"); kind=incr
    fi
    uri=$(backup_uri "${begin[@]:3}")
    timed "tm-dir-$kind-$round" "$BIN" pull "$uri" "${pull[@]}" --repo "$TM_DIR" --checkpoint "$ckpt"
    timed "tm-64k-$kind-$round" "$BIN" pull "$uri" "${pull[@]}" --repo "$TM_SMALL" --checkpoint "$ckpt"
    [ -z "$BEFORE" ] || timed "tm-before-$kind-$round" "$BEFORE" pull "$uri" "${pull[@]}" --repo "$TM_BEFORE" --checkpoint "$ckpt"
    timed "tm-s3-$kind-$round" "$BIN" pull "$uri" "${pull[@]}" --repo "$TM_S3" --checkpoint "$ckpt" --s3-endpoint "$EP"
    tm backup end vm >/dev/null
    timed "restic-dir-$kind-$round" restic backup -q -r "$DIR/restic-repo" "$IMG"
    timed "restic-s3-$kind-$round" restic backup -q -r "s3:$EP/bkt/restic" "$IMG"
    timed "borg-dir-$kind-$round" borg create "$DIR/borg-repo::p$round" "$IMG"
    if [ "$round" = 0 ]; then
        [ -z "$BEFORE" ] || full_before=$(size_of "$TM_BEFORE")
        full_tm=$(size_of "$TM_DIR"); full_small=$(size_of "$TM_SMALL"); full_restic=$(size_of "$DIR/restic-repo"); full_borg=$(size_of "$DIR/borg-repo")
    fi
    if [ "$round" = 1 ]; then
        [ -z "$BEFORE" ] || new_before=$(( $(size_of "$TM_BEFORE") - full_before ))
        new_tm=$(( $(size_of "$TM_DIR") - full_tm ))
        new_small=$(( $(size_of "$TM_SMALL") - full_small ))
        new_restic=$(( $(size_of "$DIR/restic-repo") - full_restic ))
        new_borg=$(( $(size_of "$DIR/borg-repo") - full_borg ))
    fi
    echo "  point $round done (load $(load))"
done
cp --sparse=always "$IMG" "$DIR/last.raw"   # what every restore must equal

mkdir -p "$DIR/out"
for rep in $(seq 0 $((REPS - 1))); do
    sfx=${rep/#0/}; sfx=${sfx:+.$sfx}
    rm -f "$DIR/out/tm.img"
    timed "tm-dir-restore$sfx" "$BIN" repo restore "$TM_DIR" vm@c5 --into "$DIR/out/tm.img"
    cmp "$DIR/out/tm.img" "$DIR/last.raw" || { echo "tidemark's restore (dir) differs from the image" >&2; exit 1; }
    rm -f "$DIR/out/tm.img"
    timed "tm-s3-restore$sfx" "$BIN" repo restore "$TM_S3" vm@c5 --into "$DIR/out/tm.img" --s3-endpoint "$EP"
    cmp "$DIR/out/tm.img" "$DIR/last.raw" || { echo "tidemark's restore (S3) differs from the image" >&2; exit 1; }
    if [ -n "$BEFORE" ]; then
        rm -f "$DIR/out/tm.img"
        timed "before-dir-restore$sfx" "$BEFORE" repo restore "$TM_BEFORE" vm@c5 --into "$DIR/out/tm.img"
        cmp "$DIR/out/tm.img" "$DIR/last.raw" || { echo "BEFORE_BIN's restore differs from the image" >&2; exit 1; }
    fi
    timed "restic-dir-restore$sfx" restic restore -q -r "$DIR/restic-repo" latest --target "$DIR/out/restic"
    rm -rf "$DIR/out/restic"
    timed "restic-s3-restore$sfx" restic restore -q -r "s3:$EP/bkt/restic" latest --target "$DIR/out/restic"
    rm -rf "$DIR/out/restic"
    mkdir -p "$DIR/out/borg"; cd "$DIR/out/borg"
    timed "borg-dir-restore$sfx" borg extract "$DIR/borg-repo::p5"
    cd - >/dev/null; rm -rf "$DIR/out/borg"
done

# Reading the last point over NBD: straight from each repository vs the restored image.
read_nbd() { # KEY SOCKET NAME SERVER...
    local key=$1 sock=$2 name=$3; shift 3
    rm -f "$sock"
    "$@" --socket "$sock" >/dev/null 2>"$DIR/$key.log" & local pid=$!
    wait_socket "$sock"
    timed "$key" nbdcopy "nbd+unix:///$name?socket=$sock" null:
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
for rep in $(seq 0 $((REPS - 1))); do
    sfx=${rep/#0/}; sfx=${sfx:+.$sfx}
    read_nbd "export-dir$sfx" "$DIR/x.sock" vm@c5 "$BIN" repo export "$TM_DIR" vm@c5
    read_nbd "export-s3$sfx" "$DIR/x.sock" vm@c5 "$BIN" repo export "$TM_S3" vm@c5 --s3-endpoint "$EP"
    read_nbd "export-image$sfx" "$DIR/x.sock" img "$BIN" export "$DIR/out/tm.img" --read-only --name img
    if [ -n "$BEFORE" ]; then
        read_nbd "before-export-dir$sfx" "$DIR/x.sock" vm@c5 "$BEFORE" repo export "$TM_BEFORE" vm@c5
    fi
done
if [ -n "$BEFORE" ]; then
    for key in before-dir-restore before-export-dir; do med3 "$key"; done
fi
for key in tm-dir-full-0 tm-64k-full-0 tm-s3-full-0 restic-dir-full-0 restic-s3-full-0 borg-dir-full-0 \
    tm-dir-restore tm-s3-restore restic-dir-restore restic-s3-restore borg-dir-restore \
    export-dir export-s3 export-image; do
    med3 "$key"
done

inc() { median "${T[$1-incr-1]}" "${T[$1-incr-2]}" "${T[$1-incr-3]}" "${T[$1-incr-4]}" "${T[$1-incr-5]}"; }
row() { # NAME TIDEMARK_KEY PEER_KEY PEER (timed keys; incremental keys are medians)
    local a b la lb
    case $2 in *-incr) a=$(inc "${2%-incr}"); la=${L[${2%-incr}-incr-1]} ;; *) a=${T[$2]}; la=${L[$2]} ;; esac
    case $3 in *-incr) b=$(inc "${3%-incr}"); lb=${L[${3%-incr}-incr-1]} ;; *) b=${T[$3]}; lb=${L[$3]} ;; esac
    printf '| %s | %s s (%s MB/s, load %s) | %s s (load %s) | %s |\n' "$1" "$a" "$(mbps "$SIZE" "$a")" "$la" "$b" "$lb" "$(ratio "$b" "$a")"
}
echo
echo "| step | tidemark | peer | speed ratio (peer time / tidemark time) |"
echo "|---|---|---|---|"
echo "(medians of $REPS runs; incrementals: median of the 5 points)"
row "full, directory, vs restic" tm-dir-full-0 restic-dir-full-0 restic
row "full, directory, vs borg" tm-dir-full-0 borg-dir-full-0 borg
row "full, directory with 64 KiB chunks, vs restic" tm-64k-full-0 restic-dir-full-0 restic
row "full, SeaweedFS S3, vs restic" tm-s3-full-0 restic-s3-full-0 restic
row "incremental 1% (median of 5), directory, vs restic" tm-dir-incr restic-dir-incr restic
row "incremental 1% (median of 5), directory, vs borg" tm-dir-incr borg-dir-incr borg
row "incremental 1% (median of 5), directory with 64 KiB chunks, vs restic" tm-64k-incr restic-dir-incr restic
row "incremental 1% (median of 5), S3, vs restic" tm-s3-incr restic-s3-incr restic
[ -z "$BEFORE" ] || row "incremental 1% (median of 5), directory: this build vs BEFORE_BIN" tm-dir-incr tm-before-incr before
[ -z "$BEFORE" ] || row "incremental 1% (median of 5), directory: BEFORE_BIN vs restic" tm-before-incr restic-dir-incr restic
row "restore, directory, vs restic" tm-dir-restore restic-dir-restore restic
row "restore, directory, vs borg" tm-dir-restore borg-dir-restore borg
row "restore, S3, vs restic" tm-s3-restore restic-s3-restore restic
row "nbdcopy read: repo export (directory) vs tidemark export of the restored image" export-dir export-image image
row "nbdcopy read: repo export (S3) vs tidemark export of the restored image" export-s3 export-image image
[ -z "$BEFORE" ] || row "restore, directory: this build vs BEFORE_BIN" tm-dir-restore before-dir-restore before
[ -z "$BEFORE" ] || row "nbdcopy read: repo export (directory), this build vs BEFORE_BIN" export-dir before-export-dir before
echo
echo "incremental times (s), points 1-5: tidemark dir ${T[tm-dir-incr-1]} ${T[tm-dir-incr-2]} ${T[tm-dir-incr-3]} ${T[tm-dir-incr-4]} ${T[tm-dir-incr-5]};" \
    "tidemark S3 ${T[tm-s3-incr-1]} ${T[tm-s3-incr-2]} ${T[tm-s3-incr-3]} ${T[tm-s3-incr-4]} ${T[tm-s3-incr-5]};" \
    "restic dir ${T[restic-dir-incr-1]} ${T[restic-dir-incr-2]} ${T[restic-dir-incr-3]} ${T[restic-dir-incr-4]} ${T[restic-dir-incr-5]};" \
    "restic S3 ${T[restic-s3-incr-1]} ${T[restic-s3-incr-2]} ${T[restic-s3-incr-3]} ${T[restic-s3-incr-4]} ${T[restic-s3-incr-5]};" \
    "borg ${T[borg-dir-incr-1]} ${T[borg-dir-incr-2]} ${T[borg-dir-incr-3]} ${T[borg-dir-incr-4]} ${T[borg-dir-incr-5]}"
changed=$((SIZE / 65536 / 100 * 65536))
echo "changed per incremental: $changed bytes of random (incompressible) data"
echo "new data stored by the first incremental: tidemark (4 MiB chunks) $new_tm ($(ratio "$new_tm" "$changed") of the changed bytes)," \
    "tidemark (64 KiB chunks) $new_small ($(ratio "$new_small" "$changed")), restic $new_restic ($(ratio "$new_restic" "$changed")), borg $new_borg ($(ratio "$new_borg" "$changed")) bytes"
echo "repository sizes after 6 points (directories): tidemark $(size_of "$TM_DIR") (64 KiB chunks: $(size_of "$TM_SMALL")), restic $(size_of "$DIR/restic-repo"), borg $(size_of "$DIR/borg-repo") bytes"
if [ -n "$BEFORE" ]; then
    echo "BEFORE_BIN ($BEFORE, 4 MiB chunks): new data stored by the first incremental $new_before ($(ratio "$new_before" "$changed") of the changed bytes);" \
        "incremental times (s) ${T[tm-before-incr-1]} ${T[tm-before-incr-2]} ${T[tm-before-incr-3]} ${T[tm-before-incr-4]} ${T[tm-before-incr-5]};" \
        "repository size after 6 points $(size_of "$TM_BEFORE") bytes"
fi
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
