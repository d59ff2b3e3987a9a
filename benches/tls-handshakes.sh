#!/usr/bin/env bash
# NBD-over-TLS handshakes per second (issue 19): a python3-libnbd loop (connect, STARTTLS,
# TLS handshake, GO, size, disconnect) against each TLS server of benches/tls-common.sh
# (tidemark, nbdkit, qemu-nbd; `before` with BEFORE_BIN, e.g. the previous release), in
# rounds of a rotating order; medians, with the load at each run and the server's CPU
# per handshake. With PERF=1, `perf record -g` profiles tidemark (and before) during one
# more loop each; the reports go to $PERF_DIR (default /var/tmp/tls-handshakes-perf).
#
# Usage: bash benches/tls-handshakes.sh [HANDSHAKES] [ROUNDS]   (defaults: 300 3)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp),
# BEFORE_BIN (optional), PERF, PERF_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/nbdcopy-common.sh
handshakes=${1:-300}
rounds=${2:-3}
size_mib=1
setup tls-handshakes nbdkit qemu-nbd
. benches/tls-common.sh
tls_setup

servers=(tidemark nbdkit qemu-nbd)
if [ -n "${BEFORE_BIN:-}" ]; then servers+=(before); fi
declare -A rates cpus loads
for ((round = 0; round < rounds; round++)); do
    for s in $(round_order "$round" "${servers[@]}"); do
        start "$s" read "$src"
        l=$(load)
        c0=$(server_cpu)
        r=$(handshake_rate "$(uri "$s")" "$handshakes")
        c1=$(server_cpu)
        stop
        ms=$(awk -v a="$c0" -v b="$c1" -v n="$handshakes" 'BEGIN { printf "%.3f", (b - a) * 1000 / n }')
        rates[$s]+="$r "
        cpus[$s]+="$ms "
        loads[$s]+="$l "
        echo "round $((round + 1))/$rounds: $s (load $l): $r handshakes/s, server CPU $ms ms each"
    done
done
printf '\n%-9s %13s %16s   %s\n' server "handshakes/s" "server CPU ms" "load at each run"
printf '(median of %d rounds of %d handshakes over TCP 127.0.0.1)\n' "$rounds" "$handshakes"
for s in "${servers[@]}"; do
    printf '%-9s %13s %16s   %s\n' "$s" "$(echo "${rates[$s]}" | median)" \
        "$(echo "${cpus[$s]}" | median)" "${loads[$s]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
for s in "${servers[@]:1}"; do
    printf 'tidemark / %-8s handshakes/s %sx, server CPU per handshake %sx\n' "$s" \
        "$(ratio "$(echo "${rates[tidemark]}" | median)" "$(echo "${rates[$s]}" | median)")" \
        "$(ratio "$(echo "${cpus[tidemark]}" | median)" "$(echo "${cpus[$s]}" | median)")"
done

if [ -n "${PERF:-}" ]; then
    perf_dir=${PERF_DIR:-/var/tmp/tls-handshakes-perf}
    mkdir -p "$perf_dir"
    for s in tidemark ${BEFORE_BIN:+before}; do
        start "$s" read "$src"
        perf record -q -g -o "$perf_dir/$s.data" -p "$server_pid" 2>/dev/null &
        perf_pid=$!
        sleep 0.5
        handshake_rate "$(uri "$s")" "$handshakes" >/dev/null
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        stop
        perf report -q -i "$perf_dir/$s.data" --no-children --sort dso,sym -g none --percent-limit 0.7 \
            2>/dev/null | grep -v "^$" >"$perf_dir/$s.txt" || true
        echo "perf of $s: $perf_dir/$s.txt"
    done
fi
