#!/usr/bin/env bash
# Installs what sluice's tests need (idempotent) and runs every test.
# This is the README's test command; .ci/run calls it and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

# Peers the tests drive: nbdkit (and its plugin headers and python plugin), libnbd's tools
# and Python bindings, fio, qemu's tools; GnuTLS's certtool and psktool for the TLS tests'
# keys (sluice's own OpenSSL is built from source by the openssl crate's vendored feature);
# parted and sgdisk make the partition tables the partition filter's tests read; prometheus
# (and its promtool) scrapes and checks the --metrics endpoint in tests/observe.rs;
# python3-matplotlib draws the benchmarks' --plot under /usr/bin/python3 (bench/plot.py);
# libnbd-dev builds job-bench's C pull-mode reader (bench/pull-reader.c);
# e2fsprogs (mke2fs, debugfs, e2fsck) makes and checks the ext2 filter's filesystems.
debs=(nbdkit nbdkit-plugin-dev nbdkit-plugin-python libnbd-bin python3-libnbd libnbd-dev fio
      qemu-utils gcc libpython3.11-dev gnutls-bin parted gdisk prometheus python3-matplotlib
      cryptsetup-bin xz-utils e2fsprogs)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# Ceph (mon, OSD, tools, librbd and its Python binding) for the RBD tests, which start their
# own throw-away cluster: the package list lives in ceph-cluster.sh.
scripts/ceph-cluster.sh install

# QMP client for the daemon tests; matplotlib for the benchmarks' --plot (bench/plot.py)
python3 -m pip install --quiet --disable-pip-version-check qemu.qmp matplotlib

cargo fmt --all -- --check
# Linted in the release profile, the one the tests build: build scripts (OpenSSL's C build
# among them) and proc-macros are then compiled once for both, not once per profile.
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --workspace --release

# Every fuzz target but the daemon's for 10 s, two at a time (see scripts/fuzz.sh).
scripts/fuzz.sh --jobs 2 --skip qmp_dispatch 10
python3 bench/plot.py --self-test
