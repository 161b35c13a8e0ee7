"""VMs for tests, built with real tools at test time."""

from __future__ import annotations

import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from hyper2kvm import ova, qemu_img
from hyper2kvm.ovf import parse_ovf, write_descriptor
from hyper2kvm.registration import start_problem
from hyper2kvm.sample import make_sample_ova
from tests.peers import LIBVIRT_URI

MIB = 2**20


def source_disk_as_raw(ova_path: Path, target: Path) -> Path:
    """The guest-visible content of the OVA's first disk, as a raw file."""
    members = ova.read_members(ova_path)
    vmdk = next(m for name, m in members.items() if name.endswith(".vmdk"))
    qemu_img.convert(qemu_img.DiskSource(ova_path, "vmdk", vmdk.offset, vmdk.size), target,
                     output_format="raw")
    return target


def make_truncated_ova(folder: Path, name: str) -> Path:
    """An OVA whose VMDK is cut in half, with a manifest that agrees: it passes every
    checksum and fails in qemu-img."""
    with tempfile.TemporaryDirectory() as work:
        scratch = Path(work)
        good = make_sample_ova(scratch, name, size_mib=32, random_mib=8)
        members = ova.read_members(good)
        vm = parse_ovf(ova.read_member(good, members[f"{name}.ovf"])).vm
        vmdk = scratch / f"{name}-disk1.vmdk"
        data = ova.read_member(good, members[vmdk.name])
        vmdk.write_bytes(data[: len(data) // 2])
        target = folder / f"{name}.ova"
        ova.write_ova(target, write_descriptor(scratch, vm, [vmdk]))
    return target


def make_random_raw(folder: Path, name: str, size_mib: int) -> Path:
    """A bare raw disk of incompressible data (slow to turn into a streamOptimized VMDK)."""
    path = folder / f"{name}.raw"
    with path.open("wb") as stream:
        for _ in range(size_mib):
            stream.write(os.urandom(MIB))
    return path


def domain_xml(name: str) -> ET.Element:
    """The domain's XML as libvirt has it defined."""
    conn = libvirt.open(LIBVIRT_URI)
    try:
        return ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()


def domain_facts(name: str) -> dict:
    xml = domain_xml(name)
    return {
        "vcpus": int(xml.findtext("vcpu") or 0),
        "memory_kib": int(xml.findtext("memory") or 0),
        "disks": [d.find("source").get("file") for d in xml.findall("devices/disk")],
        "macs": [m.get("address") for m in xml.findall("devices/interface/mac")],
        "machine": xml.find("os/type").get("machine"),
    }


def domain_firmware(name: str) -> str:
    """'efi' or 'bios', as the domain's XML says."""
    os_element = domain_xml(name).find("os")
    assert os_element is not None
    loader = os_element.find("loader")
    efi = os_element.get("firmware") == "efi" or (loader is not None
                                                   and "OVMF" in (loader.text or ""))
    return "efi" if efi else "bios"


def domain_secure_boot(name: str) -> bool:
    """Whether the domain's firmware has secure boot on, as its XML says."""
    xml = domain_xml(name)
    feature = xml.find("os/firmware/feature[@name='secure-boot']")
    loader = xml.find("os/loader")
    return (feature is not None and feature.get("enabled") == "yes") or (
        loader is not None and loader.get("secure") == "yes")


def start_and_stop(name: str) -> bool:
    """The domain starts for real (its vCPUs run), then stops."""
    return start_problem(LIBVIRT_URI, name, paused=False) is None


def pool_volumes(name: str) -> list[str]:
    """The volumes of an active, autostarted storage pool."""
    conn = libvirt.open(LIBVIRT_URI)
    try:
        pool = conn.storagePoolLookupByName(name)
        assert pool.isActive() and pool.autostart()
        return sorted(pool.listVolumes())
    finally:
        conn.close()


def domain_defined(name: str) -> bool:
    conn = libvirt.open(LIBVIRT_URI)
    try:
        return name in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def qemu_img_running_on(path: Path) -> bool:
    done = subprocess.run(["pgrep", "-af", "qemu-img"], capture_output=True, text=True)
    return any(str(path) in line for line in done.stdout.splitlines())


def boot_sector_disk(path: Path, message: bytes, *, wait_for_key: bool = False,
                     size_mib: int = 1) -> Path:
    """A raw disk whose boot sector (x86 real mode, hand-assembled) writes `message` to the
    first serial port, waiting for the UART to take each byte, then halts; with
    `wait_for_key` it first waits for a byte typed on that port (a getty that shows its
    prompt only after Enter). The smallest guest that boots to a "login prompt"."""
    wait = (b"\xba\xfd\x03"      # mov dx, 0x3fd (line status)
            b"\xec"              # rx: in al, dx
            b"\xa8\x01"          # test al, 1 (data ready)
            b"\x74\xfb"          # jz rx
            b"\xba\xf8\x03"      # mov dx, 0x3f8
            b"\xec") if wait_for_key else b""  # in al, dx (take the byte)
    start = 7 + len(wait)  # where `next` lands: after the setup and the wait
    code = (b"\x31\xc0"          # xor ax, ax
            b"\x8e\xd8"          # mov ds, ax
            + b"\xbe" + (0x7C00 + start + 26).to_bytes(2, "little")  # mov si, message
            + wait +
            b"\xac"              # next: lodsb
            b"\x84\xc0"          # test al, al
            b"\x74\x12"          # jz done
            b"\x88\xc3"          # mov bl, al
            b"\xba\xfd\x03"      # mov dx, 0x3fd
            b"\xec"              # tx: in al, dx
            b"\xa8\x20"          # test al, 0x20 (transmitter empty)
            b"\x74\xfb"          # jz tx
            b"\x88\xd8"          # mov al, bl
            b"\xba\xf8\x03"      # mov dx, 0x3f8
            b"\xee"              # out dx, al
            b"\xeb\xe9"          # jmp next
            b"\xf4"              # done: hlt
            b"\xeb\xfd")         # jmp done
    sector = code + message + b"\x00"
    assert len(code) == start + 26
    assert len(sector) <= 510, "message too long for one boot sector"
    with path.open("wb") as stream:
        stream.truncate(size_mib * MIB)
        stream.write(sector)
        stream.seek(510)
        stream.write(b"\x55\xaa")
    return path
