# Shell functions the repository benches share (benches/repo-peers.sh, repo-restore.sh,
# repo-export.sh, repo-crypt.sh); sourced, not run. They expect $DIR (the scratch
# directory) and `set -euo pipefail`.

# repo_scratch: a fresh, empty $DIR; on exit the processes in PIDS are stopped and $DIR
# removed.
repo_scratch() {
    rm -rf "$DIR"
    mkdir -p "$DIR"
    PIDS=()
    trap repo_cleanup EXIT
}
repo_cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
load() { cut -d' ' -f1 /proc/loadavg; }
median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "$@"; }
wait_socket() { for _ in $(seq 300); do [ -S "$1" ] && return; sleep 0.1; done; echo "no socket $1" >&2; exit 1; }

# make_image PATH MIB: the benches' volume image, half random data and half zeros in
# alternating MiB.
make_image() {
    python3 - "$1" "$2" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(mib):
        f.write(os.urandom(1 << 20) if i % 2 == 0 else bytes(1 << 20))
PY
}

# change_volume URI SIZE SEED: 1% of a SIZE-byte volume rewritten in scattered 64 KiB
# random writes through its live NBD export (python3-libnbd), flushed.
change_volume() {
    /usr/bin/python3 - "$1" "$2" "$3" <<'PY'
import os, random, sys
import nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1]); size = int(sys.argv[2])
random.seed(int(sys.argv[3]))
for b in random.sample(range(size // 65536), max(1, size // 65536 // 100)):
    h.pwrite(os.urandom(65536), b * 65536)
h.flush(); h.shutdown()
PY
    sync
}
