# Shell functions the NBD-over-TLS benches share (benches/tls-peers.sh,
# benches/tls-bound.sh); sourced after benches/nbdcopy-common.sh and its `setup`.
#
# The servers, all on TCP 127.0.0.1 with the same certificates (a test CA, an ECDSA P-256
# server certificate, client certificates required):
#   tidemark     `tidemark export --listen --tls-creds`
#   qemu-nbd     --object tls-creds-x509,...,endpoint=server,verify-peer=on --tls-creds
#   nbdkit       --tls=require --tls-certificates --tls-verify-peer, file plugin
#   plain        `tidemark export --listen --listen-insecure` (TCP without TLS: what TLS costs)
#   before       (only with BEFORE_BIN) another tidemark binary with the same TLS settings

# tls_setup: make the certificates ($creds: the server's directory, $client: a client's
# allowed in) and pick the first port.
tls_setup() {
    /usr/bin/python3 -c "import nbd" || { echo "missing python3-libnbd: run scripts/install-deps.sh" >&2; exit 1; }
    /usr/bin/python3 tests/src/tls_certs.py "$work/certs" >/dev/null
    creds=$work/certs/server
    client=$work/certs/admin
    port=$((20000 + RANDOM % 20000))
    # Set server_cpus (e.g. 0) to run the servers under `taskset -c $server_cpus`.
    server_cpus=
}

# start NAME MODE FILE: starts server NAME (MODE read: read-only) on 127.0.0.1:$port,
# pinned to $server_cpus if set; sets $server_pid.
start() {
    local name=$1 mode=$2 file=$3 ro=() pin=()
    port=$((port + 1))
    [ -n "$server_cpus" ] && pin=(taskset -c "$server_cpus")
    case $name in
    tidemark | plain | before)
        [ "$mode" = read ] && ro=(--read-only)
        local tls=(--tls-creds "$creds") server_bin=$bin
        [ "$name" = plain ] && tls=(--listen-insecure)
        [ "$name" = before ] && server_bin=$BEFORE_BIN
        "${pin[@]}" "$server_bin" export "$file" "${ro[@]}" --listen "127.0.0.1:$port" --name disk \
            "${tls[@]}" >/dev/null 2>&1 &
        ;;
    qemu-nbd)
        [ "$mode" = read ] && ro=(-r)
        "${pin[@]}" qemu-nbd -f raw -t -e 16 "${ro[@]}" --cache=writeback --aio=threads \
            --object "tls-creds-x509,id=tls0,dir=$creds,endpoint=server,verify-peer=on" \
            --tls-creds tls0 -b 127.0.0.1 -p "$port" -x disk "$file" &
        ;;
    nbdkit)
        [ "$mode" = read ] && ro=(-r)
        "${pin[@]}" nbdkit -f -i 127.0.0.1 -p "$port" "${ro[@]}" --tls=require \
            "--tls-certificates=$creds" --tls-verify-peer file "file=$file" &
        ;;
    esac
    server_pid=$!
    pids+=("$server_pid")
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "$name did not start" >&2
    return 1
}

# uri NAME: the NBD URI of server NAME on $port.
uri() {
    if [ "$1" = plain ]; then
        echo "nbd://127.0.0.1:$port/disk"
    else
        echo "nbds://127.0.0.1:$port/disk?tls-certificates=$client"
    fi
}

# cipher NAME: what the client (libnbd, GnuTLS) negotiated with the server on $port.
cipher() {
    if [ "$1" = plain ]; then
        echo "none (plain TCP)"
        return
    fi
    LIBNBD_DEBUG=1 nbdinfo --size "$(uri "$1")" 2>&1 >/dev/null |
        sed -n 's/.*connection is using TLS: cipher \([^ ]*\).*/\1/p' | head -1
}

load() { cut -d' ' -f1 /proc/loadavg; }

# server_cpu: CPU seconds (user + system, all threads) the server on $server_pid has used
# so far: the figure a loaded machine does not distort.
server_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$server_pid/stat"; }

# handshake_rate URI COUNT: handshakes per second against URI, each a python3-libnbd
# connect (STARTTLS, TLS handshake, GO), a size query and a disconnect.
handshake_rate() {
    /usr/bin/python3 - "$1" "$2" <<'PY'
import sys, time
import nbd
uri, n = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
for _ in range(n):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    assert h.get_size() > 0
    h.shutdown()
    del h
print(f"{n / (time.monotonic() - t0):.1f}")
PY
}
