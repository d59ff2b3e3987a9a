#!/usr/bin/env bash
# Install the Debian packages the test suite drives (the real NBD peers, fio, ...),
# only those missing, so a second run costs nothing.
set -euo pipefail
packages=(qemu-utils libnbd-bin nbdkit python3-libnbd fio nbd-server e2fsprogs util-linux)
# The quiesce VM test (tests/tests/quiesce_vm.rs): the guest harness's host side, and
# python3 for the test's writer. qemu-system-x86 may bring Debian's qemu-utils 7.2 along.
packages+=(qemu-system-x86 cpio kmod python3)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# nbd-server's package starts a system daemon we do not use; tests start their own.
systemctl disable --now nbd-server >/dev/null 2>&1 || true
