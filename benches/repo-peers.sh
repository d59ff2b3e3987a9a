#!/usr/bin/env bash
# Issue 18's benchmark: the backup repository side by side with restic and borg, one run.
#
#   bash benches/repo-peers.sh [SIZE_MIB]      (default 4096; needs root to drop caches)
#
# A daemon volume of SIZE_MIB (half random data, half zeros) is backed up in full with
# `tidemark pull --full --repo`, then 1% of it is rewritten in scattered 64 KiB random
# writes through the live NBD export (python3-libnbd) and backed up incrementally with
# `pull --bitmap`; restic (`restic backup` of the same image file, twice) and borg (`borg
# create`, directory only) do the same. Then each restores the second point. Targets: a
# directory, and SeaweedFS's S3 (`weed mini` on 127.0.0.1) for tidemark and restic. Caches
# are dropped before every timed step. Prints seconds, MB/s, repository sizes and ratios.
# Env: BENCH_DIR (default /var/tmp/tidemark-repo-bench), TIDEMARK_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-4096}
DIR=${BENCH_DIR:-/var/tmp/tidemark-repo-bench}
BIN=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
[ "$(id -u)" = 0 ] || { echo "run as root: timed steps drop the page cache" >&2; exit 2; }
for tool in restic borg weed /usr/bin/python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (bash scripts/install-deps.sh)" >&2; exit 2; }
done
[ -x "$BIN" ] || cargo build --release -q -p tidemark
rm -rf "$DIR"; mkdir -p "$DIR"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
mbps() { python3 -c "print(f'{$1 / 1e6 / $2:.1f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
size_of() { du -sb "$1" | cut -f1; }

IMG=$DIR/vm.raw
python3 - "$IMG" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(mib):
        f.write(os.urandom(1 << 20) if i % 2 == 0 else bytes(1 << 20))
PY
STATE=$DIR/state
"$BIN" serve --state-dir "$STATE" >"$DIR/daemon.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do [ -S "$STATE/control.sock" ] && break; sleep 0.1; done
tm() { "$BIN" "$@" --state-dir "$STATE"; }
tm volume create vm --backing "$IMG" >/dev/null
NBD_SOCK=$STATE/nbd.sock
SIZE=$((SIZE_MIB << 20))

weed_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$DIR/weed"
AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S S3_BUCKET=bkt weed mini -dir="$DIR/weed" -ip=127.0.0.1 \
    -ip.bind=127.0.0.1 -s3.port="$weed_port" >"$DIR/weed.log" 2>&1 & PIDS+=($!)
export AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S AWS_REGION=us-east-1
EP=http://127.0.0.1:$weed_port
for _ in $(seq 120); do "$BIN" repo init s3://bkt/probe --s3-endpoint "$EP" >/dev/null 2>&1 && break; sleep 0.5; done
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
"$BIN" repo init "$DIR/tm-repo" >/dev/null
"$BIN" repo init s3://bkt/tm --s3-endpoint "$EP" >/dev/null
restic init -q -r "$DIR/restic-repo"
restic init -q -r "s3:$EP/bkt/restic"
borg init -q -e none "$DIR/borg-repo"

declare -A T
backup_tidemark() { # STEP URL [EXTRA...]: STEP full (point c0) or incr (point c1 from c0)
    local step=$1 url=$2; shift 2
    local ckpt=c0 args=(--full) begin=(backup begin vm)
    if [ "$step" = incr ]; then
        ckpt=c1; args=(--bitmap c0); begin+=(--incremental c0)
    elif [ "$url" = "$DIR/tm-repo" ]; then
        begin+=(--checkpoint c0)   # the first full backup starts the tracked chain
    fi
    local uri
    uri=$(tm "${begin[@]}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["volumes"][0]["uri"]["unix"])')
    drop; local t0; t0=$(now)
    "$BIN" pull "$uri" "${args[@]}" --repo "$url" --checkpoint "$ckpt" "$@" --json >"$DIR/last.json"
    T[$step-$url]=$(secs "$t0" "$(now)")
    tm backup end vm >/dev/null
}
timed() { local key=$1; shift; drop; local t0; t0=$(now); "$@" >/dev/null; T[$key]=$(secs "$t0" "$(now)"); }

echo "repository benchmark: ${SIZE_MIB} MiB volume (half random, half zero), load $(cut -d' ' -f1-3 /proc/loadavg)"
backup_tidemark full "$DIR/tm-repo"
backup_tidemark full s3://bkt/tm --s3-endpoint "$EP"
timed restic-full-dir restic backup -q -r "$DIR/restic-repo" "$IMG"
timed restic-full-s3 restic backup -q -r "s3:$EP/bkt/restic" "$IMG"
timed borg-full borg create "$DIR/borg-repo::p0" "$IMG"
size_full_tm=$(size_of "$DIR/tm-repo"); size_full_restic=$(size_of "$DIR/restic-repo"); size_full_borg=$(size_of "$DIR/borg-repo")

# 1% of the volume in scattered 64 KiB random writes through the live export.
/usr/bin/python3 - "nbd+unix:///vm?socket=$NBD_SOCK" "$SIZE" <<'PY'
import os, random, sys
import nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1]); size = int(sys.argv[2])
random.seed(18)
for b in random.sample(range(size // 65536), max(1, size // 65536 // 100)):
    h.pwrite(os.urandom(65536), b * 65536)
h.flush(); h.shutdown()
PY
sync
backup_tidemark incr "$DIR/tm-repo"
backup_tidemark incr s3://bkt/tm --s3-endpoint "$EP"
timed restic-incr-dir restic backup -q -r "$DIR/restic-repo" "$IMG"
timed restic-incr-s3 restic backup -q -r "s3:$EP/bkt/restic" "$IMG"
timed borg-incr borg create "$DIR/borg-repo::p1" "$IMG"
new_tm=$(( $(size_of "$DIR/tm-repo") - size_full_tm ))
new_restic=$(( $(size_of "$DIR/restic-repo") - size_full_restic ))
new_borg=$(( $(size_of "$DIR/borg-repo") - size_full_borg ))

mkdir -p "$DIR/out"
timed tm-restore-dir "$BIN" repo restore "$DIR/tm-repo" vm@c1 --into "$DIR/out/tm.img"
rm -f "$DIR/out/tm.img"
timed tm-restore-s3 "$BIN" repo restore s3://bkt/tm vm@c1 --into "$DIR/out/tm.img" --s3-endpoint "$EP"
cmp "$DIR/out/tm.img" "$IMG" || { echo "tidemark's restore differs from the image" >&2; exit 1; }
rm -f "$DIR/out/tm.img"
timed restic-restore-dir restic restore -q -r "$DIR/restic-repo" latest --target "$DIR/out/restic"
rm -rf "$DIR/out/restic"
timed restic-restore-s3 restic restore -q -r "s3:$EP/bkt/restic" latest --target "$DIR/out/restic"
rm -rf "$DIR/out/restic"
(cd "$DIR/out" && timed borg-restore borg extract "$DIR/borg-repo::p1")
rm -rf "$DIR/out"

row() { # NAME TIDEMARK_SECS PEER_SECS PEER
    printf '%-34s %8s s %8s s (%s)  tidemark %s MB/s, ratio %s\n' "$1" "$2" "$3" "$4" \
        "$(mbps "$SIZE" "$2")" "$(ratio "$3" "$2")"
}
echo
echo "step                               tidemark     peer           (speed ratio = peer time / tidemark time)"
row "full, directory vs restic" "${T[full-$DIR/tm-repo]}" "${T[restic-full-dir]}" restic
row "full, directory vs borg" "${T[full-$DIR/tm-repo]}" "${T[borg-full]}" borg
row "full, SeaweedFS S3 vs restic" "${T[full-s3://bkt/tm]}" "${T[restic-full-s3]}" restic
row "incremental 1%, directory vs restic" "${T[incr-$DIR/tm-repo]}" "${T[restic-incr-dir]}" restic
row "incremental 1%, directory vs borg" "${T[incr-$DIR/tm-repo]}" "${T[borg-incr]}" borg
row "incremental 1%, S3 vs restic" "${T[incr-s3://bkt/tm]}" "${T[restic-incr-s3]}" restic
row "restore, directory vs restic" "${T[tm-restore-dir]}" "${T[restic-restore-dir]}" restic
row "restore, directory vs borg" "${T[tm-restore-dir]}" "${T[borg-restore]}" borg
row "restore, S3 vs restic" "${T[tm-restore-s3]}" "${T[restic-restore-s3]}" restic
echo
echo "changed: $((SIZE / 100)) bytes of random data"
echo "new data stored by the incremental: tidemark $new_tm, restic $new_restic, borg $new_borg bytes"
echo "repository size after 2 points: tidemark $(size_of "$DIR/tm-repo"), restic $(size_of "$DIR/restic-repo"), borg $(size_of "$DIR/borg-repo") bytes"
