#!/usr/bin/env bash
# What bounds an NBD read over TLS on this machine: the server or the client (issue 19)?
#
# nbdcopy (libnbd, GnuTLS) copies a page-cached file (2 GiB by default) from each server
# of benches/tls-common.sh (tidemark, plain, nbdkit, qemu-nbd; `before` with BEFORE_BIN)
# to `null:`, and the bench records for every run the wall time, the CLIENT's CPU
# (nbdcopy's user + system from /usr/bin/time) and the SERVER's (from /proc/PID/stat), in
# these scenarios:
#   defaults   nbdcopy's defaults (the issue's bench), nothing pinned: on 2 CPUs nbdcopy
#              runs 2 threads with a connection each, 64 requests of 256 KiB in flight
#   pinned     the server under `taskset -c 0`, nbdcopy under `taskset -c 1`: one CPU each.
#              A client busy ~1.0 CPU-s per wall-s against every TLS server means the read
#              rate is the client's limit; its rate is then 1 GiB / (client CPU s/GiB).
#   C1 C4 R16  nbdcopy --connections=1, --connections=4 --threads=4 (its connections are
#              capped at its threads), --requests=16, nothing pinned: does another client
#              setting change the ranking?
#   aes128     nbdcopy's defaults with the client's GnuTLS limited to AES-128-GCM (a
#              GNUTLS_SYSTEM_PRIORITY_FILE disabling the other ciphers), nothing pinned:
#              what the cipher costs the client (by default GnuTLS asks for AES-256-GCM
#              first, and every server here takes it: see the "negotiated" lines).
# Per scenario it prints, as medians over the rounds: MB/s, client and server CPU s/GiB,
# how busy each side was (CPU-s per wall-s), the client's one-CPU ceiling (1 GiB per
# client CPU s/GiB) and the two-CPU bound 2 / (client + server CPU s/GiB): no read on 2
# CPUs can beat it, since both sides' CPU is spent on the same two cores.
# Every round runs each scenario's servers once in a rotating order (backwards in odd
# rounds); the load average is printed with each run: the machine is shared.
#
# Usage: bash benches/tls-bound.sh [SIZE_MIB] [ROUNDS]   (defaults: 2048 3)
# Env: TIDEMARK_BIN (default target/release/tidemark, built if missing), BENCH_DIR (tmp),
# BEFORE_BIN (optional: another tidemark binary beside the others), SCENARIOS (default
# "defaults pinned C1 C4 R16 aes128").
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/nbdcopy-common.sh
size_mib=${1:-2048}
rounds=${2:-3}
setup tls-bound nbdcopy nbdkit qemu-nbd taskset
[ -x /usr/bin/time ] || { echo "missing /usr/bin/time: run scripts/install-deps.sh" >&2; exit 1; }
. benches/tls-common.sh
tls_setup

read -r -a scenarios <<<"${SCENARIOS:-defaults pinned C1 C4 R16 aes128}"
servers=(tidemark plain nbdkit qemu-nbd)
if [ -n "${BEFORE_BIN:-}" ]; then servers+=(before); fi

# The nbdcopy options of scenario $1.
client_args() {
    case $1 in
    defaults | pinned | aes128) ;;
    C1) echo --connections=1 ;;
    C4) echo --connections=4 --threads=4 ;;
    R16) echo --requests=16 ;;
    *) echo "unknown scenario $1" >&2; exit 1 ;;
    esac
}

aes128=$work/gnutls-aes128.conf
printf '[overrides]\n' >"$aes128"
for c in AES-256-GCM AES-256-CCM AES-256-CBC CHACHA20-POLY1305 AES-128-CCM AES-128-CBC; do
    printf 'tls-disabled-cipher = %s\n' "$c" >>"$aes128"
done

echo "negotiated (libnbd's view, nbdinfo): by default, and in scenario aes128"
for s in "${servers[@]}"; do
    start "$s" read "$src"
    printf '  %-9s %-12s %s\n' "$s" "$(cipher "$s")" "$(GNUTLS_SYSTEM_PRIORITY_FILE=$aes128 cipher "$s")"
    stop
done

# measure SCENARIO SERVER: one read; appends wall, client and server CPU to the results.
measure() {
    local sc=$1 s=$2 prefix=(env) l c0 c1 t0 t1 wall ccpu scpu
    read -r -a args <<<"$(client_args "$sc")"
    server_cpus=
    if [ "$sc" = pinned ]; then
        server_cpus=0
        prefix=(taskset -c 1)
    fi
    [ "$sc" = aes128 ] && prefix=(env "GNUTLS_SYSTEM_PRIORITY_FILE=$aes128")
    start "$s" read "$src"
    l=$(load)
    c0=$(server_cpu)
    t0=$(date +%s.%N)
    "${prefix[@]}" /usr/bin/time -f '%U %S' -o "$work/time" nbdcopy "${args[@]}" "$(uri "$s")" null:
    t1=$(date +%s.%N)
    c1=$(server_cpu)
    stop
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    ccpu=$(awk '{ printf "%.2f", $1 + $2 }' "$work/time")
    scpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')
    results[$sc.$s.wall]+="$wall "
    results[$sc.$s.client]+="$ccpu "
    results[$sc.$s.server]+="$scpu "
    loads[$sc.$s]+="$l "
    echo "round $((round + 1))/$rounds $sc: $s (load $l): ${wall}s, client CPU ${ccpu}s, server CPU ${scpu}s"
}

declare -A results loads
for ((round = 0; round < rounds; round++)); do
    for sc in "${scenarios[@]}"; do
        for s in $(round_order "$round" "${servers[@]}"); do
            measure "$sc" "$s"
        done
    done
done

gib=$(awk -v m="$size_mib" 'BEGIN { print m / 1024 }')
mb=$((size_mib * 1048576))
per_gib() { echo "${results[$1]}" | median | awk -v g="$gib" '{ printf "%.3f", $1 / g }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
for sc in "${scenarios[@]}"; do
    printf '\n%s: nbdcopy %s(median of %d, %d MiB over TCP 127.0.0.1, MB/s = 10^6 B/s)\n' \
        "$sc" "$(client_args "$sc") " "$rounds" "$size_mib"
    printf '%-9s %7s %12s %8s %12s %8s %12s %12s   %s\n' server "MB/s" "client s/GiB" "busy" \
        "server s/GiB" "busy" "client-ceil" "2-CPU bound" "load at each run"
    declare -A rate
    for s in "${servers[@]}"; do
        rate[$s]=$(rate_mbps "$mb" "${results[$sc.$s.wall]}")
        c=$(per_gib "$sc.$s.client")
        v=$(per_gib "$sc.$s.server")
        w=$(per_gib "$sc.$s.wall")
        printf '%-9s %7.0f %12s %8s %12s %8s %12.0f %12.0f   %s\n' "$s" "${rate[$s]}" \
            "$c" "$(ratio "$c" "$w")" "$v" "$(ratio "$v" "$w")" \
            "$(awk -v c="$c" 'BEGIN { print 1073.741824 / c }')" \
            "$(awk -v c="$c" -v v="$v" 'BEGIN { print 2 * 1073.741824 / (c + v) }')" \
            "${loads[$sc.$s]}"
    done
    printf 'tidemark / nbdkit %sx, / qemu-nbd %sx, TLS / plain %sx' \
        "$(ratio "${rate[tidemark]}" "${rate[nbdkit]}")" \
        "$(ratio "${rate[tidemark]}" "${rate[qemu-nbd]}")" \
        "$(ratio "${rate[tidemark]}" "${rate[plain]}")"
    if [ -n "${BEFORE_BIN:-}" ]; then
        printf ', / before %sx' "$(ratio "${rate[tidemark]}" "${rate[before]}")"
    fi
    echo
done
