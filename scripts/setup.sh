#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for hypersdk: system packages (qemu-img, libvirt,
# OVMF, partitioning and ext4 tools; virt-v2v and libguestfs for guest conversion, with a
# kernel for libguestfs's appliance; nbdkit, nbdcopy and libnbd for the one-pass path;
# mmdebstrap for the sample guest), the virtualenv
# at .venv, and a running libvirtd.
# With --tests also the test peers that are built or installed here: Go and govmomi's
# sources and the vCenter simulators (tests/vcsim/build.sh → tests/vcsim/bin), and Azurite
# (npm, into /var/cache/hypersdk/azurite), Samba (the Hyper-V tests' SMB server, run as
# a plain process); moto comes with the dev extra.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=false
[ "${1:-}" = "--tests" ] && tests=true

packages=(qemu-utils qemu-system-x86 libvirt-daemon libvirt-daemon-system libvirt-clients
          libvirt-daemon-driver-qemu libvirt-dev pkg-config ovmf e2fsprogs fdisk jq curl gcc
          iproute2 procps
          virt-v2v libguestfs-tools linux-image-amd64 nbdkit libnbd-bin python3-libnbd mmdebstrap
          python3-venv python3-dev)
$tests && packages+=(golang-go golang-github-vmware-govmomi-dev samba smbclient postgresql-15)
# Azurite needs Node and npm: Debian's unless a Node with its npm is already there
$tests && ! command -v npm >/dev/null && packages+=(nodejs npm)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q --config-settings editable_mode=compat -e '.[dev,vsphere,aws,azure,gcp,oci,hyperv]' \
    2>&1 | grep -v -i "warning" || true
# libnbd's Python binding (the one-pass path's writes into qemu-nbd) is not on PyPI:
# Debian's, linked into the virtualenv (one module and its extension, nothing else)
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ln -sf /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod.cpython-*.so \
    "$site/"
.venv/bin/python -c "import prefect, libvirt, fastapi, boto3, azure.mgmt.compute, nbd" \
    || { echo "setup: the virtualenv is incomplete" >&2; exit 1; }

scripts/start-libvirt.sh
if $tests; then
    tests/vcsim/build.sh tests/vcsim/bin
    .venv/bin/python -c "from tests.azure_sim import install_azurite; install_azurite()"
fi
echo "setup: ready (.venv, qemu-img $(qemu-img --version | head -1 | awk '{print $3}'), libvirt)"
