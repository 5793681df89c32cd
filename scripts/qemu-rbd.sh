#!/usr/bin/env bash
# A qemu-nbd with QEMU's rbd block driver, for comparing sluice's RBD backend with the peer.
#
#   scripts/qemu-rbd.sh DIR     prints the path of DIR/qemu-nbd, a wrapper that runs it
#
# QEMU's rbd driver is a loadable module (block-rbd.so) shipped in Debian's qemu-block-extra.
# A module loads only into the very build it came from, and this machine's qemu-utils is a
# newer build (a backport) than the qemu-block-extra its package sources offer. So the two
# packages of one version (qemu-block-extra's candidate) are downloaded with `apt-get
# download` and unpacked into DIR, without installing anything or touching the system's
# qemu-nbd; the wrapper points QEMU_MODULE_DIR at the unpacked modules. Idempotent: a DIR
# whose wrapper already runs is left as it is. Needs librbd1 (installed
# by scripts/ceph-cluster.sh install).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$(mkdir -p "$1" && cd "$1" && pwd)
wrapper=$dir/qemu-nbd

# The wrapper is written last, so its presence means the unpacking finished.
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
    echo "$wrapper"
    exit 0
fi

version=$(apt-cache policy qemu-block-extra | sed -n 's/^ *Candidate: //p')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "qemu-rbd.sh: no qemu-block-extra package in this machine's package sources" >&2
    exit 1
fi
debs=$dir/debs
rm -rf "$debs" "$dir/root"
mkdir -p "$debs"
# apt-get download writes into the current directory; as root it warns that the _apt user
# cannot write there, which is harmless.
(cd "$debs" && apt-get download -q "qemu-block-extra=$version" "qemu-utils=$version" \
    2> >(grep -v 'unsandboxed as root' >&2)) >&2
for deb in "$debs"/*.deb; do
    dpkg-deb -x "$deb" "$dir/root"
done
module=$(find "$dir/root" -name block-rbd.so | head -n 1)
[ -n "$module" ] || { echo "qemu-rbd.sh: no block-rbd.so in $version" >&2; exit 1; }
moddir=$(dirname "$module")
cat >"$wrapper.tmp" <<EOF
#!/bin/sh
# qemu-nbd $version with its rbd module, unpacked by scripts/qemu-rbd.sh
QEMU_MODULE_DIR=$moddir exec $dir/root/usr/bin/qemu-nbd "\$@"
EOF
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
echo "$wrapper"
