"""libvirt domain XML for a converted VM: q35, BIOS or UEFI, virtio everywhere."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config import UefiFirmware
from core.models import VMInfo
from hyper2kvm.cpu import CpuChoice


@dataclass(frozen=True)
class DomainDisk:
    path: Path
    format: Literal["qcow2", "raw"]


@dataclass(frozen=True)
class NetworkMap:
    """Source network name → libvirt network; 'user' means user-mode networking."""

    default: str = "default"
    by_source: dict[str, str] = field(default_factory=dict)

    def target(self, source: str | None) -> str:
        return self.by_source.get(source or "", self.default)


def needs_compat(vm: VMInfo) -> bool:
    """Windows has no virtio drivers of its own: without them it cannot boot from virtio."""
    return (vm.guest_os or "").lower().startswith("win")


def disk_target(index: int, prefix: str) -> str:
    """The guest's name of disk `index`: vda…vdz, vdaa… (or sd…)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return prefix + letters


def domain_xml(
    vm: VMInfo,
    disks: list[DomainDisk],
    *,
    name: str | None = None,
    domain_type: Literal["kvm", "qemu"] = "qemu",
    networks: NetworkMap | None = None,
    compat: bool | None = None,
    cpu: CpuChoice | None = None,
    uefi: UefiFirmware | None = None,
) -> str:
    """The domain definition for `vm` with its converted `disks`, in boot order. In
    compatibility mode (default: for Windows guests) disks are SATA and NICs e1000, which
    guests without virtio drivers can use. `cpu` comes from hyper2kvm.cpu.choose_cpu;
    without it QEMU's baseline CPU. A UEFI VM gets `uefi`'s OVMF build, or the one libvirt
    picks for it."""
    networks = networks or NetworkMap()
    compat = needs_compat(vm) if compat is None else compat
    bus, prefix, nic_model = ("sata", "sd", "e1000") if compat else ("virtio", "vd", "virtio")
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = name or vm.name
    ET.SubElement(domain, "memory", unit="MiB").text = str(vm.memory_mb)
    ET.SubElement(domain, "currentMemory", unit="MiB").text = str(vm.memory_mb)
    ET.SubElement(domain, "vcpu", placement="static").text = str(vm.cpus)
    if vm.guest_os:
        metadata = ET.SubElement(domain, "metadata")
        source = ET.SubElement(metadata, "hypersdk:source", {"xmlns:hypersdk": "urn:hypersdk:1"})
        source.set("provider", vm.provider)
        source.set("identifier", vm.identifier)
        source.set("guest_os", vm.guest_os)

    os_element = ET.SubElement(domain, "os")
    efi = vm.firmware == "efi"
    if efi and uefi is None:
        os_element.set("firmware", "efi")
    ET.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    if efi and uefi is None:
        firmware = ET.SubElement(os_element, "firmware")
        ET.SubElement(firmware, "feature", enabled="yes" if vm.secure_boot else "no",
                      name="secure-boot")
    elif efi and uefi is not None:
        ET.SubElement(os_element, "loader", readonly="yes", type="pflash",
                      secure="yes" if uefi.secure_boot else "no").text = str(uefi.code)
        ET.SubElement(os_element, "nvram", template=str(uefi.vars))  # libvirt names it
    ET.SubElement(os_element, "boot", dev="hd")

    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if vm.secure_boot or (efi and uefi is not None and uefi.secure_boot):
        ET.SubElement(features, "smm", state="on")
    cpu_element = cpu.element() if cpu else None
    if cpu_element is not None:
        domain.append(cpu_element)
    ET.SubElement(domain, "clock", offset="utc")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"

    devices = ET.SubElement(domain, "devices")
    for index, disk in enumerate(disks):
        element = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(element, "driver", name="qemu", type=disk.format, discard="unmap")
        ET.SubElement(element, "source", file=str(disk.path))
        ET.SubElement(element, "target", dev=disk_target(index, prefix), bus=bus)
    for nic in vm.nics:
        target = networks.target(nic.network)
        if target == "user":
            interface = ET.SubElement(devices, "interface", type="user")
        else:
            interface = ET.SubElement(devices, "interface", type="network")
            ET.SubElement(interface, "source", network=target)
        if nic.mac:
            ET.SubElement(interface, "mac", address=nic.mac)
        ET.SubElement(interface, "model", type=nic_model)
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devices, "memballoon", model="virtio")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")
