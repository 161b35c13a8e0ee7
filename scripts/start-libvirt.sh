#!/usr/bin/env bash
# Make sure qemu:///system answers. Under systemd, start the service; without it (CI,
# containers) run virtlogd and libvirtd ourselves. Never start the 'default' network:
# it needs dnsmasq and would create a bridge on the host.
set -euo pipefail

if virsh -c qemu:///system version >/dev/null 2>&1; then
    exit 0
fi
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    # a root-only /dev/kvm makes libvirt re-probe QEMU for 30-60 s on every define
    chgrp kvm /dev/kvm 2>/dev/null && chmod 0660 /dev/kvm 2>/dev/null || true
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start libvirtd || true
else
    pgrep -x virtlogd >/dev/null || /usr/sbin/virtlogd -d
    pgrep -x libvirtd >/dev/null || /usr/sbin/libvirtd -d
fi
for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "start-libvirt: qemu:///system does not answer" >&2
exit 1
