"""What the domain we will define needs of this host, checked before any byte moves: the
networks its NICs map to, room for its disks, its firmware, and its size against the
host's. Each problem is one sentence that names the thing and the fix."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from core.config import UefiFirmware
from core.models import Blocker, VMInfo
from hyper2kvm.domain import NetworkMap
from hyper2kvm.registration import connect

GIB = 1 << 30


def network_problems(uri: str, vm: VMInfo, networks: NetworkMap) -> list[Blocker]:
    """Each NIC whose libvirt network is missing, or neither active nor set to start with
    libvirt: such a domain defines fine and then does not start."""
    problems: list[Blocker] = []
    with connect(uri) as conn:
        for index, nic in enumerate(vm.nics, start=1):
            target = networks.target(nic.network)
            if target == "user":
                continue
            which = (f"NIC {index} ({nic.mac or 'no MAC'}, source network "
                     f"{nic.network or 'none'!r}) maps to libvirt network {target!r}")
            fix = ("or map it with hyper2kvm.network_map (\"user\" for user-mode "
                   "networking)")
            try:
                network = conn.networkLookupByName(target)
            except libvirt.libvirtError:
                problems.append(Blocker(code="network_not_found", message=(
                    f"{which}, which does not exist on {uri}: define it, {fix}")))
                continue
            if not network.isActive() and not network.autostart():
                problems.append(Blocker(code="network_inactive", message=(
                    f"{which}, which is not active on {uri}: `virsh net-start {target}` (and "
                    f"`virsh net-autostart {target}`), {fix}")))
    return problems


def free_space(folder: Path) -> tuple[Path, int]:
    """The nearest folder at or above `folder` that exists, and its free bytes."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing, shutil.disk_usage(existing).free


def space_problem(folder: Path, needed: int) -> Blocker | None:
    """`folder` (or the nearest folder above it that exists) has less than `needed` bytes
    free."""
    existing, free = free_space(folder)
    if free >= needed:
        return None
    return Blocker(code="no_space", message=(
        f"{existing} has {free / GIB:.2f} GiB free, the disks need {needed / GIB:.2f} GiB: "
        "free space there, or point hyper2kvm.output_dir elsewhere"))


def firmware_problem(uri: str, vm: VMInfo, domain_type: str, *,
                     uefi: UefiFirmware | None = None) -> Blocker | None:
    """The machine type we define (q35) missing for this domain type, or a UEFI VM (with
    Secure Boot) on a host whose libvirt offers no such firmware for it, or whose
    configured firmware (`uefi`, hyper2kvm.uefi_firmware) is not there or cannot do it."""
    with connect(uri) as conn:
        try:
            caps = ET.fromstring(conn.getDomainCapabilities(None, "x86_64", "q35",
                                                            domain_type, 0))
        except libvirt.libvirtError as exc:
            return Blocker(code="no_machine_type", message=(
                f"libvirt on {uri} has no q35 machine for {domain_type} domains, which the "
                f"domain would be: {exc}"))
    if vm.firmware != "efi":
        return None
    if uefi is not None:
        return _configured_firmware_problem(vm, uefi)
    firmware = {value.text for value in caps.iterfind("os/enum[@name='firmware']/value")}
    loaders = [value.text or "" for value in caps.iterfind("os/loader/value")]
    secure = {value.text for value in caps.iterfind("os/loader/enum[@name='secure']/value")}
    if "efi" not in firmware or not any(os.path.exists(path) for path in loaders):
        return Blocker(code="no_uefi_firmware", message=(
            f"{vm.name} boots with UEFI and libvirt on {uri} has no UEFI firmware (OVMF) for "
            "q35: install it (Debian: apt install ovmf)"))
    if vm.secure_boot and "yes" not in secure:
        return Blocker(code="no_secure_boot_firmware", message=(
            f"{vm.name} boots with UEFI Secure Boot and libvirt on {uri} has no OVMF build "
            "with Secure Boot for q35: install one (Debian: apt install ovmf)"))
    return None


def _configured_firmware_problem(vm: VMInfo, uefi: UefiFirmware) -> Blocker | None:
    for key, path in (("code", uefi.code), ("vars", uefi.vars)):
        if not path.is_file():
            return Blocker(code="no_uefi_firmware", message=(
                f"{vm.name} boots with UEFI and hyper2kvm.uefi_firmware.{key} {path} is not "
                "a file: point it at the OVMF build (Debian: apt install ovmf; "
                "/usr/share/OVMF), or remove uefi_firmware to let libvirt pick"))
    if vm.secure_boot and not uefi.secure_boot:
        return Blocker(code="no_secure_boot_firmware", message=(
            f"{vm.name} boots with UEFI Secure Boot and hyper2kvm.uefi_firmware is not a "
            "Secure Boot build: point it at one (e.g. OVMF_CODE_4M.secboot.fd with "
            "OVMF_VARS_4M.ms.fd) and set secure_boot: true"))
    return None


def size_warnings(uri: str, vm: VMInfo) -> list[str]:
    """The VM asks for more vCPUs or memory than this host has."""
    with connect(uri) as conn:
        _model, memory_mib, cpus, *_ = conn.getInfo()
    warnings = []
    if vm.cpus > cpus:
        warnings.append(f"{vm.name} has {vm.cpus} vCPUs, this host {cpus} CPUs")
    if vm.memory_mb > memory_mib:
        warnings.append(f"{vm.name} has {vm.memory_mb} MiB of memory, this host {memory_mib} MiB")
    return warnings
