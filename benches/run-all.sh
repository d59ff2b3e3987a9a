#!/usr/bin/env bash
# Every peer benchmark of the project in one run, side by side, with the ratios the issues
# ask for. Each section is a script of its own (run it alone to dig into one area):
#
#   benches/nbd-peers.sh      NBD read/write: tidemark export vs nbdkit, qemu-nbd, nbd-server
#   benches/bench-nbd.sh      tidemark bench measuring each of those NBD servers
#   benches/copy-peers.sh     copy vs nbdcopy, dd, qemu-img, cp, fio; update-img vs a 4 KiB loop
#   cargo bench (criterion)   engine write path and formats hot paths
#   benches/bench-vs-fio.sh   accuracy: tidemark bench vs fio, same workloads, within 10%
#
# Every peer comparison reports medians of paired runs (the two tools alternate inside a
# pair, so drift on this noisy machine hits both); BENCH_RUNS sets the number of pairs
# (the fio accuracy check uses at least 5 ABBA samples).
# The combined output goes to stdout and to benches/results/latest.md; with
# --update-readme it also replaces the block between the run-all markers in README.md.
#
# Usage: benches/run-all.sh [--runs N] [--only SECTION]... [--update-readme]
#   env NBD_PEERS_MIB (2048) and COPY_PEERS_GIB (4): data sizes of those two sections.
#   SECTION: nbd, bench-nbd, copy, criterion, fio
# Exit status: 0 when every section ran and passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

export BENCH_RUNS=${BENCH_RUNS:-5}
only=()
update_readme=0
while (($#)); do
    case "$1" in
        --runs) BENCH_RUNS=$2; shift 2 ;;
        --only) only+=("$2"); shift 2 ;;
        --update-readme) update_readme=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "run-all: unknown argument $1" >&2; exit 2 ;;
    esac
done

wanted() { ((${#only[@]} == 0)) || [[ " ${only[*]} " == *" $1 "* ]]; }

cargo build --release --quiet -p tidemark || { echo "run-all: the release build failed" >&2; exit 1; }
export TIDEMARK_BIN=$PWD/target/release/tidemark

mkdir -p benches/results
out=benches/results/latest.md
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
failures=0

{
    echo "# tidemark peer benchmarks ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM," \
        "kernel $(uname -r), /var/tmp on $(stat -f -c %T /var/tmp)." \
        "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown). Pairs per figure: $BENCH_RUNS."
    echo "Reproduce: \`benches/run-all.sh --runs $BENCH_RUNS\`"
} | tee "$tmp"

# section NAME TITLE LIMIT_SECONDS COMMAND...
section() {
    local name=$1 title=$2 limit=$3
    shift 3
    wanted "$name" || return 0
    printf '\n## %s\n\n' "$title" | tee -a "$tmp"
    echo "\`$*\`" | tee -a "$tmp"
    echo | tee -a "$tmp"
    if [[ ! -e "$1" && "$1" == benches/* ]]; then
        echo "(not run: $1 does not exist yet)" | tee -a "$tmp"
        failures=$((failures + 1))
        return 0
    fi
    local started=$SECONDS status=0 command=("$@")
    if declare -F "$1" >/dev/null; then
        command=(bash -c "$(declare -f "$1"); $*")
    elif [[ "$1" == *.sh ]]; then
        command=(bash "$@")
    fi
    timeout --kill-after=30 "$limit" "${command[@]}" 2> >(sed 's/^/    /' >&2) | tee -a "$tmp"
    status=${PIPESTATUS[0]}
    if ((status != 0)); then
        echo "(section failed with exit status $status after $((SECONDS - started)) s)" | tee -a "$tmp"
        failures=$((failures + 1))
    fi
}

criterion_summary() {
    # Quick criterion runs of every bench target; keep the per-benchmark time and
    # throughput lines.
    local targets
    targets=$(find benches/benches -name '*.rs' -printf '%f\n' 2>/dev/null | sed 's/\.rs$//' | sort)
    if [[ -z "$targets" ]]; then
        echo "(no criterion benchmarks in benches/benches/ yet)"
        return 1
    fi
    echo '```'
    for target in $targets; do
        if grep -q 'criterion_main!' "benches/benches/$target.rs"; then
            # Criterion: the benchmark names and their time and throughput lines.
            cargo bench --quiet -p tidemark-benches --bench "$target" -- --quick --noplot 2>/dev/null |
                grep -E 'time:|thrpt:|^[[:alnum:]_/ -]+$' | grep -v -e '^$' -e '%' || true
        else
            # A harness of its own (engine_write): its table is the summary.
            cargo bench --quiet -p tidemark-benches --bench "$target" 2>/dev/null || true
        fi
    done
    echo '```'
}

section nbd "NBD read/write: tidemark export vs nbdkit, qemu-nbd, nbd-server" 1800 benches/nbd-peers.sh "${NBD_PEERS_MIB:-2048}" "$BENCH_RUNS"
section bench-nbd "tidemark bench measuring NBD servers (tidemark export, qemu-nbd, nbdkit, nbd-server)" 900 benches/bench-nbd.sh
section copy "copy vs nbdcopy, dd, qemu-img, cp, fio; update-img vs the 4 KiB loop" 1800 benches/copy-peers.sh "${COPY_PEERS_GIB:-4}" "$BENCH_RUNS"
section criterion "Criterion: engine write path and formats hot paths (quick runs)" 1800 criterion_summary
section fio "Accuracy: tidemark bench vs fio (io_uring), same file, same workloads" 1200 benches/bench-vs-fio.sh --runs "$((BENCH_RUNS < 5 ? 5 : BENCH_RUNS))"

cp "$tmp" "$out"
echo
echo "run-all: wrote $out ($failures section(s) missing or failed)"

if ((update_readme)); then
    python3 - "$out" README.md <<'EOF'
import sys
results, readme = sys.argv[1], sys.argv[2]
begin, end = "<!-- run-all:begin -->", "<!-- run-all:end -->"
text = open(readme).read()
if begin not in text or end not in text:
    sys.exit(f"run-all: {readme} has no {begin} ... {end} block to update")
body = open(results).read().replace("# tidemark peer benchmarks", "#### Latest run:", 1)
body = body.replace("\n## ", "\n##### ")
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open(readme, "w").write(f"{head}{begin}\n{body}\n{end}{tail}")
print(f"run-all: updated the performance block of {readme}")
EOF
fi
((failures == 0))
