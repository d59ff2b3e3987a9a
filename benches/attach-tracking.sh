#!/usr/bin/env bash
# Change tracking on vs off through an attached device (issue 16): fio with O_DIRECT on
# three volumes of one daemon, each attached with `tidemark volume attach --via fuse` (a
# loop device over the daemon's FUSE file):
#   off       a volume with no checkpoint (nothing is tracked: the engine's `off` mode),
#   durable   default (durable) tracking, a fresh checkpoint before every run, so blocks
#             turn dirty during the run (each first write to a block syncs its bit first),
#   fast      `--tracking fast`, a fresh checkpoint before every run (bits saved at clean
#             stops only),
# for 1 MiB sequential writes (QD 8) and 4 KiB random writes (QD 32). This is the engine's
# own criterion comparison (benches/benches/engine_write.rs: off / durable / fast) seen
# through FUSE + loop. Every round runs each target once, in a rotating order; the figure
# is the median over rounds, the ratios are mode / off, and the load is the median of the
# 1-minute load average at the start of each run of that row. Needs root (FUSE, loop).
#
# Usage: bash benches/attach-tracking.sh [SIZE_MIB] [ROUNDS] [SECONDS]   (defaults: 1024 3 5)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp),
#      TIDEMARK_BASELINE_BIN: another tidemark binary (e.g. main's) whose daemon serves a
#      fourth target, `durable-base` (durable tracking, fresh checkpoint per run), in the
#      same rounds, so before/after share one session.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
rounds=${2:-3}
secs=${3:-5}
bin=${TIDEMARK_BIN:-$PWD/target/release/tidemark}
if [ ! -x "$bin" ]; then cargo build --release -p tidemark; fi
for tool in fio python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-deps.sh" >&2; exit 1; }
done

work=$(mktemp -d "${BENCH_DIR:-/tmp}/attach-tracking.XXXXXX")
state=$work/state
base_state=$work/base-state
baseline_bin=${TIDEMARK_BASELINE_BIN:-}
names=(off durable fast)
[ -n "$baseline_bin" ] && names+=(durable-base)
daemon=
base_daemon=
# tm NAME ARGS...: the CLI of the daemon serving volume NAME.
tm() {
    local n=$1
    shift
    if [ "$n" = durable-base ]; then
        "$baseline_bin" "$@" --state-dir "$base_state"
    else
        "$bin" "$@" --state-dir "$state"
    fi
}
cleanup() {
    for n in "${names[@]}"; do tm "$n" volume detach "$n" >/dev/null 2>&1 || true; done
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
    [ -n "$base_daemon" ] && kill "$base_daemon" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

size=$((size_mib * 1024 * 1024))
for n in "${names[@]}"; do head -c "$size" /dev/urandom >"$work/$n.raw"; done
sync

"$bin" serve --state-dir "$state" >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do [ -S "$state/control.sock" ] && break; sleep 0.1; done
if [ -n "$baseline_bin" ]; then
    "$baseline_bin" serve --state-dir "$base_state" >"$work/base-daemon.log" 2>&1 &
    base_daemon=$!
    for _ in $(seq 100); do [ -S "$base_state/control.sock" ] && break; sleep 0.1; done
fi
declare -A device
for n in "${names[@]}"; do
    mode=()
    [ "$n" = fast ] && mode=(--tracking fast)
    tm "$n" volume create "$n" --backing "$work/$n.raw" "${mode[@]}" >/dev/null
    device[$n]=$(tm "$n" volume attach "$n" --via fuse)
done

# fresh NAME: a new checkpoint `c` on the tracked volumes, so the run starts with every
# bit clean (the first write to each block pays for its bit, as after a backup).
fresh() {
    [ "$1" = off ] && return
    tm "$1" checkpoint delete "$1" c >/dev/null 2>&1 || true
    tm "$1" checkpoint create "$1" c >/dev/null
}

# run DEVICE RW BS QD: prints MB/s
run() {
    fio --name=b --filename="$1" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
        --iodepth="$4" --size="$size" --runtime="$secs" --time_based --group_reporting \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % (j["write"]["bw_bytes"]/1e6))'
}

workloads=("seq-write write 1M 8" "rand-write randwrite 4k 32")
results=$work/results
: >"$results"
for r in $(seq "$rounds"); do
    for w in "${workloads[@]}"; do
        read -r label rw bs qd <<<"$w"
        order=("${names[@]}")
        for ((k = 0; k < (r - 1) % ${#names[@]}; k++)); do order=("${order[@]:1}" "${order[0]}"); done
        for n in "${order[@]}"; do
            fresh "$n"
            load=$(cut -d' ' -f1 /proc/loadavg)
            echo "$label $n $(run "${device[$n]}" "$rw" "$bs" "$qd") $load" >>"$results"
        done
    done
done
# The durable volume's tracking really ran: its checkpoint has dirty blocks.
dirty=$(tm durable volume info durable --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(json.dumps(v.get("checkpoints", v)))')

echo "## attach: tracking on vs off through the device (FUSE + loop), fio O_DIRECT, ${size_mib} MiB, ${secs} s per run, median of $rounds ($(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
python3 - "$results" <<'EOF'
import statistics, sys
rows, loads = {}, {}
for line in open(sys.argv[1]):
    label, name, mbs, load = line.split()
    rows.setdefault(label, {}).setdefault(name, []).append(float(mbs))
    loads.setdefault(label, []).append(float(load))
goal = {"seq-write": 0.9, "rand-write": 0.7}
base = "durable-base" in rows["seq-write"]
extra = " durable-base MB/s | durable-base / off |" if base else ""
print(f"| workload | off MB/s | durable MB/s | fast MB/s | durable / off | fast / off |{extra} goal (durable) | load |")
print("|---|---|---|---|---|---|" + ("---|---|" if base else "") + "---|---|")
for label in ["seq-write", "rand-write"]:
    m = {n: statistics.median(v) for n, v in rows[label].items()}
    ratio = m["durable"] / m["off"]
    met = "met" if ratio >= goal[label] else "not met"
    cells = f" {m['durable-base']:.1f} | {m['durable-base'] / m['off']:.2f}x |" if base else ""
    print(f"| {label} | {m['off']:.1f} | {m['durable']:.1f} | {m['fast']:.1f} | {ratio:.2f}x | "
          f"{m['fast'] / m['off']:.2f}x |{cells} >= {goal[label]}x: {met} | {statistics.median(loads[label]):.1f} |")
print()
print("Every run (MB/s, load):")
for label in ["seq-write", "rand-write"]:
    for name in sorted(rows[label]):
        print(f"- {label} {name}: {', '.join('%.1f' % v for v in rows[label][name])}")
EOF
echo
echo "durable volume after the last run: $dirty"
