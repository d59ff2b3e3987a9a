#!/usr/bin/env bash
# NBD over TLS on TCP 127.0.0.1, side by side with the peers, in one run (issue 19).
#
# Reads: nbdcopy copies a page-cached file (2 GiB by default) from each server to `null:`.
# Writes: nbdcopy copies that file into a fresh writable export of each server and flushes
# (--flush). The servers (tidemark, qemu-nbd, nbdkit, plain, before) are those of
# benches/tls-common.sh, all with the same certificates.
# Handshakes: a python3-libnbd loop (connect, STARTTLS, TLS handshake, GO, disconnect)
# against each TLS server, in handshakes per second.
# Every round runs each server once, in a rotating order that runs backwards in odd
# rounds; the figure per server is the median over rounds, ratios are tidemark / peer
# (>1 = faster). The load average is printed with each run: the machine is shared.
#
#   before       (only with BEFORE_BIN) another tidemark binary, e.g. the previous
#                release, with the same TLS settings: a before/after comparison in one run
# Usage: bash benches/tls-peers.sh [SIZE_MIB] [ROUNDS] [HANDSHAKES]   (defaults: 2048 3 200)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp),
# BEFORE_BIN (optional, see above).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/nbdcopy-common.sh
size_mib=${1:-2048}
rounds=${2:-3}
handshakes=${3:-200}
setup tls-peers nbdcopy nbdkit qemu-nbd
. benches/tls-common.sh
tls_setup

servers=(tidemark qemu-nbd nbdkit plain)
if [ -n "${BEFORE_BIN:-}" ]; then servers+=(before); fi
declare -A results loads
for ((round = 0; round < rounds; round++)); do
    for s in $(round_order "$round" "${servers[@]}"); do
        start "$s" read "$src"
        l=$(load)
        tr=$(timed "$(uri "$s")" null:)
        cpu=$(server_cpu)
        hs=-
        if [ "$s" != plain ]; then hs=$(handshake_rate "$(uri "$s")" "$handshakes"); fi
        stop
        results[$s.read]+="$tr "
        results[$s.hs]+="$hs "
        results[$s.cpu]+="$cpu "
        timed_write "$s"
        t=$write_secs
        results[$s.write]+="$t "
        loads[$s]+="$l "
        echo "round $((round + 1))/$rounds: $s (load $l): read ${tr}s (server CPU ${cpu}s), write ${t}s, handshakes/s $hs"
    done
done

mb=$((size_mib * 1048576))
printf '\n%-9s %10s %10s %12s %13s   %s\n' server "read MB/s" "write MB/s" "handshakes/s" "read CPU s/GiB" "load at each run"
printf '(median of %d paired runs, %d MiB over TCP 127.0.0.1, MB/s = 10^6 B/s)\n' "$rounds" "$size_mib"
declare -A rate
for s in "${servers[@]}"; do
    for op in read write; do
        rate[$s.$op]=$(rate_mbps "$mb" "${results[$s.$op]}")
    done
    rate[$s.hs]=-
    if [ "$s" != plain ]; then rate[$s.hs]=$(echo "${results[$s.hs]}" | median); fi
    rate[$s.cpu]=$(echo "${results[$s.cpu]}" | median | awk -v m="$size_mib" '{ printf "%.2f", $1 * 1024 / m }')
    printf '%-9s %10.0f %10.0f %12s %13s   %s\n' "$s" "${rate[$s.read]}" "${rate[$s.write]}" \
        "${rate[$s.hs]}" "${rate[$s.cpu]}" "${loads[$s]}"
done
echo
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
peers=(qemu-nbd nbdkit)
if [ -n "${BEFORE_BIN:-}" ]; then peers+=(before); fi
for s in "${peers[@]}"; do
    printf 'tidemark / %-8s read %sx  write %sx  handshakes %sx  read CPU per byte %sx\n' "$s" \
        "$(ratio "${rate[tidemark.read]}" "${rate[$s.read]}")" \
        "$(ratio "${rate[tidemark.write]}" "${rate[$s.write]}")" \
        "$(ratio "${rate[tidemark.hs]}" "${rate[$s.hs]}")" \
        "$(ratio "${rate[tidemark.cpu]}" "${rate[$s.cpu]}")"
done
printf 'tidemark TLS / plain TCP: read %sx  write %sx\n' \
    "$(ratio "${rate[tidemark.read]}" "${rate[plain.read]}")" \
    "$(ratio "${rate[tidemark.write]}" "${rate[plain.write]}")"
