#!/usr/bin/env bash
# Build a small but real Linux guest the way VMware leaves one: Debian 12 from Debian's
# packages (mmdebstrap), GRUB on an MBR disk, a serial console with a login prompt on
# ttyS0, open-vm-tools installed, /dev/sda1 in fstab, and an initramfs that holds the
# VMware SCSI drivers but no virtio ones (MODULES=list, as a host-only initramfs).
# On virtio disks it cannot find its root file system until a guest conversion adds them.
#
#   scripts/build-guest.sh [CACHE_DIR]   → prints CACHE_DIR/<key>/debian-vmware.raw
#
# Built once per machine: the result is cached outside the checkout under a key made
# from this script's content (default /var/cache/hypersdk/guest), so a changed recipe
# builds afresh. Needs root, mmdebstrap, e2fsprogs, sfdisk and guestfish.
set -euo pipefail
cache=${1:-${HYPERSDK_GUEST_CACHE:-/var/cache/hypersdk/guest}}
key=$(sha256sum "$0" | cut -c1-16)
out="$cache/$key"
disk="$out/debian-vmware.raw"
if [ -s "$disk" ]; then
    echo "$disk"
    exit 0
fi
mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg

customize='
set -e
root=$1
echo debian-vmware > "$root/etc/hostname"
printf "127.0.0.1 localhost\n127.0.1.1 debian-vmware\n" > "$root/etc/hosts"
printf "/dev/sda1 / ext4 errors=remount-ro 0 1\n" > "$root/etc/fstab"
chroot "$root" passwd -d root >/dev/null
cat > "$root/etc/default/grub" <<EOF
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 rootdelay=5"
GRUB_TERMINAL="console serial"
EOF
printf "MODULES=list\n" > "$root/etc/initramfs-tools/conf.d/vmware-host-only.conf"
printf "mptspi\nmptsas\nvmw_pvscsi\nsd_mod\next4\ncrc32c_generic\n" \
    > "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all >/dev/null
rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_Packages
'
mmdebstrap --quiet --variant=minbase --mode=root \
    --include=systemd-sysv,udev,kmod,linux-image-amd64,grub-pc,initramfs-tools,open-vm-tools,e2fsprogs \
    --customize-hook="$customize" \
    bookworm "$work/root" >/dev/null

if lsinitramfs "$work"/root/boot/initrd.img-* | grep -q 'virtio_blk'; then
    echo "build-guest: the initramfs has virtio_blk; it would not be a VMware guest's" >&2
    exit 1
fi

raw="$work/disk.raw"
size_mib=2048
truncate -s "${size_mib}M" "$raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk --quiet "$raw"
mke2fs -q -F -t ext4 -E offset=1048576 -d "$work/root" "$raw" "$(( (size_mib - 1) * 1024 ))k"
# GRUB's installer needs the disk as a block device: the libguestfs appliance has one
guestfish --rw -a "$raw" -m /dev/sda1 <<'EOF' >/dev/null
command "grub-install --target=i386-pc /dev/sda"
command "update-grub"
EOF
mv "$raw" "$disk"
echo "$disk"
