"""OVF, OVA, manifests and path confinement, on files made by our code and by qemu-img."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from core.errors import InvalidRequest, PathNotAllowed, VerificationError
from core.models import DiskInfo, NicInfo, VMInfo
from core.paths import confine
from hyper2kvm import ova
from hyper2kvm.detect import detect_format
from hyper2kvm.manifest import parse_manifest
from hyper2kvm.ovf import parse_ovf, render_ovf
from hyper2kvm.sample import make_sample_ova

VIRTUALBOX_OVF = """<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
 xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References><File ovf:id="file1" ovf:href="web-disk001.vmdk"/></References>
  <DiskSection><Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="10" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1"
     ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>Logical networks</Info><Network ovf:name="NAT"/></NetworkSection>
  <VirtualSystem ovf:id="web">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96"><Info>OS</Info><Description>Debian_64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection><Info>Virtual hardware requirements</Info>
      <Item><rasd:Caption>4 virtual CPU</rasd:Caption><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>NAT</rasd:Connection>
        <rasd:InstanceID>6</rasd:InstanceID><rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>7</rasd:InstanceID><rasd:Parent>5</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent><rasd:ResourceType>15</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def test_virtualbox_ovf_parses() -> None:
    vm = parse_ovf(VIRTUALBOX_OVF).vm
    assert (vm.name, vm.cpus, vm.memory_mb, vm.firmware) == ("web", 4, 2048, "bios")
    assert vm.guest_os == "Debian_64"
    assert len(vm.disks) == 1
    assert vm.disks[0].capacity_bytes == 10 * 2**30
    assert vm.disks[0].controller == "sata"
    assert vm.disks[0].file == "web-disk001.vmdk"
    assert vm.nics[0].network == "NAT" and vm.nics[0].adapter == "e1000"
    assert vm.cdroms == 1


def test_rendered_ovf_round_trips_every_field() -> None:
    vm = VMInfo(identifier="db", name="db", provider="local", cpus=8, memory_mb=16384,
                firmware="efi", secure_boot=True, guest_os="rhel9_64Guest",
                disks=[DiskInfo(name="a", capacity_bytes=5 * 2**30, file="db-1.vmdk"),
                       DiskInfo(name="b", capacity_bytes=2**30, file="db-2.vmdk",
                                controller="ide")],
                nics=[NicInfo(mac="00:50:56:01:02:03", network="Prod", adapter="vmxnet3"),
                      NicInfo(mac="00:50:56:01:02:04", network="Backup", adapter="e1000")],
                cdroms=1)
    text = render_ovf(vm, [("db-1.vmdk", 100), ("db-2.vmdk", 200)], include_cdrom=True)
    back = parse_ovf(text)
    assert back.vm.cpus == 8 and back.vm.memory_mb == 16384
    assert back.vm.firmware == "efi" and back.vm.secure_boot
    assert back.vm.guest_os == "rhel9_64Guest"
    assert [d.capacity_bytes for d in back.vm.disks] == [5 * 2**30, 2**30]
    assert [d.controller for d in back.vm.disks] == ["scsi", "ide"]
    assert [d.file for d in back.vm.disks] == ["db-1.vmdk", "db-2.vmdk"]
    assert [(n.mac, n.network) for n in back.vm.nics] == [
        ("00:50:56:01:02:03", "Prod"), ("00:50:56:01:02:04", "Backup")]
    assert back.vm.cdroms == 1
    assert {f.href: f.size for f in back.files.values()} == {"db-1.vmdk": 100, "db-2.vmdk": 200}


def test_sample_ova_is_a_real_ova(tmp_path: Path) -> None:
    path = make_sample_ova(tmp_path, "s1", size_mib=16)
    members = ova.read_members(path)
    assert list(members)[0] == "s1.ovf"  # the descriptor first, as OVF requires
    disk = members["s1-disk1.vmdk"]
    assert detect_format(path, offset=disk.offset) == "vmdk"
    manifest = parse_manifest(ova.read_member(path, members["s1.mf"]).decode())
    assert set(manifest) == {"s1.ovf", "s1-disk1.vmdk"}


@pytest.mark.parametrize("member", ["../evil.vmdk", "/etc/evil.vmdk"])
def test_ova_with_escaping_member_is_refused(tmp_path: Path, member: str) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 10)
    bad = tmp_path / "bad.ova"
    with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(payload, arcname="vm.ovf")
        info = tarfile.TarInfo(member)  # set directly: add() would strip a leading '/'
        info.size = 10
        with payload.open("rb") as data:
            archive.addfile(info, data)
    with pytest.raises(InvalidRequest, match="escapes the archive"):
        ova.read_members(bad)


def test_ova_with_a_link_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "link.ova"
    with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("vm.ovf")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(InvalidRequest, match="not a regular file"):
        ova.read_members(bad)


def test_manifest_lines_are_checked() -> None:
    entries = parse_manifest("SHA256(a.ovf)= ABCD\nSHA1(b.vmdk)=ef01\n")
    assert entries == {"a.ovf": ("sha256", "abcd"), "b.vmdk": ("sha1", "ef01")}
    with pytest.raises(VerificationError, match="line 1"):
        parse_manifest("MD5(a.ovf)= 00\n")


def test_confine_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    root.mkdir()
    assert confine("vm1", root) == root.resolve() / "vm1"
    assert confine(root / "a" / "b", root) == root.resolve() / "a" / "b"
    for escape in ("../elsewhere", "/etc", "a/../../x"):
        with pytest.raises(PathNotAllowed):
            confine(escape, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "sneaky")
    with pytest.raises(PathNotAllowed):
        confine("sneaky/vm", root)


@pytest.mark.parametrize(("fmt", "options", "expected"), [
    ("vpc", "subformat=dynamic", "vpc"),
    ("vhdx", "", "vhdx"),
    ("qcow2", "", "qcow2"),
    ("raw", "", "raw"),
    ("vmdk", "subformat=monolithicSparse", "vmdk"),
    ("vmdk", "subformat=monolithicFlat", "vmdk"),
])
def test_formats_are_detected_by_header(tmp_path: Path, fmt: str, options: str,
                                        expected: str) -> None:
    import subprocess

    path = tmp_path / f"disk.{fmt}"
    command = ["qemu-img", "create", "-q", "-f", fmt, *(["-o", options] if options else []),
               str(path), "8M"]
    subprocess.run(command, check=True)
    assert detect_format(path) == expected


def test_vhdx_converts_to_qcow2_with_its_content(tmp_path: Path) -> None:
    from hyper2kvm import qemu_img
    from hyper2kvm.sample import make_disk

    raw = tmp_path / "d.raw"
    make_disk(raw, size_mib=16)
    vhdx = tmp_path / "d.vhdx"
    qemu_img.convert(qemu_img.DiskSource(raw, "raw"), vhdx, output_format="vhdx")  # type: ignore[arg-type]
    out = tmp_path / "d.qcow2"
    qemu_img.convert(qemu_img.DiskSource(vhdx, detect_format(vhdx)), out, output_format="qcow2")
    assert qemu_img.compare(raw, out)


def test_ovf_2_envelope_parses_like_ovf_1() -> None:
    vm = VMInfo(identifier="v2", name="v2", provider="local", cpus=2, memory_mb=1024,
                disks=[DiskInfo(name="a", capacity_bytes=2**30, file="v2-1.vmdk"),
                       DiskInfo(name="b", capacity_bytes=2**30, file="v2-2.vmdk")],
                nics=[NicInfo(mac="00:50:56:aa:bb:cc", network="Prod")])
    text = render_ovf(vm, [("v2-1.vmdk", 10), ("v2-2.vmdk", 20)])
    ovf2 = text.replace("http://schemas.dmtf.org/ovf/envelope/1",
                        "http://schemas.dmtf.org/ovf/envelope/2")
    back = parse_ovf(ovf2).vm
    assert (back.cpus, back.memory_mb, [d.unit for d in back.disks]) == (2, 1024, [0, 1])
    assert back.nics[0].mac == "00:50:56:aa:bb:cc"


def test_stream_optimized_vmdk_is_read_through_io_uring(tmp_path: Path) -> None:
    """The one source io_uring speeds up (bench/convert.py) is read through it, inside an
    OVA too, and converts to the same content; other sources keep qemu's default."""
    from hyper2kvm import qemu_img
    from hyper2kvm.sample import make_disk

    if not qemu_img.supports_io_uring():
        pytest.skip("this kernel or qemu-img has no io_uring")
    raw = tmp_path / "d.raw"
    make_disk(raw, size_mib=16, random_mib=8)
    sparse = tmp_path / "sparse.vmdk"
    qemu_img.convert(qemu_img.DiskSource(raw, "raw"), sparse, output_format="vmdk",
                     subformat="monolithicSparse")
    ova_path = make_sample_ova(tmp_path, "uring", size_mib=16, random_mib=8)
    member = next(m for name, m in ova.read_members(ova_path).items()
                  if name.endswith(".vmdk"))
    in_ova = qemu_img.DiskSource(ova_path, "vmdk", member.offset, member.size)

    assert qemu_img.fastest_reader(in_ova).aio == "io_uring"
    assert '"aio": "io_uring"' in qemu_img.fastest_reader(in_ova).spec()
    assert qemu_img.fastest_reader(qemu_img.DiskSource(sparse, "vmdk")).aio is None
    assert qemu_img.fastest_reader(qemu_img.DiskSource(raw, "raw")).aio is None
    forced = qemu_img.DiskSource(ova_path, "vmdk", member.offset, member.size, aio="threads")
    assert qemu_img.fastest_reader(forced) == forced

    via_uring = tmp_path / "via-uring.qcow2"
    qemu_img.convert(in_ova, via_uring, output_format="qcow2")
    via_threads = tmp_path / "via-threads.qcow2"
    flat = tmp_path / "flat.raw"
    qemu_img.convert(forced, flat, output_format="raw")
    qemu_img.convert(qemu_img.DiskSource(flat, "raw"), via_threads, output_format="qcow2")
    assert qemu_img.compare(via_uring, via_threads)
