"""Staging: check exported files against their descriptor and manifest, check each disk is
the format it claims and reads nothing outside the allowed roots (hyper2kvm.chain), and
say where each disk's bytes are (OVA members are read in place, never extracted).

Small files (the descriptor) are hashed here; a disk's checksum is checked while it is
converted (hyper2kvm.convert), so its data is read from disk once."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from core.errors import InvalidRequest, VerificationError
from core.models import DiskInfo, ExportedFile, ExportResult, VMInfo
from core.paths import confine
from hyper2kvm import ova, qemu_img
from hyper2kvm.chain import confine_chain
from hyper2kvm.detect import checked_format, claimed_format
from hyper2kvm.manifest import digest_file, parse_manifest
from hyper2kvm.ovf import parse_ovf
from hyper2kvm.qemu_img import DiskSource
from hyper2kvm.vmdk import parse_vmdk


class StagedDisk(BaseModel):
    """One disk ready to convert: where its bytes are and what they must hash to."""

    model_config = ConfigDict(extra="forbid")

    disk: DiskInfo
    path: Path
    format: str
    offset: int = 0
    size: int
    algorithm: str | None = None
    digest: str | None = None

    def source(self) -> DiskSource:
        in_container = self.offset > 0
        return DiskSource(self.path, self.format, self.offset,
                          self.size if in_container else None)


class StagedVM(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: VMInfo
    disks: list[StagedDisk]
    verified: dict[str, str]  # file name → digest checked here

    def missing(self) -> str | None:
        """A staged disk whose file is gone or too short now, or None."""
        for disk in self.disks:
            try:
                size = disk.path.stat().st_size
            except OSError:
                return f"{disk.path} is gone"
            if size < disk.offset + disk.size:
                return f"{disk.path} is {size} bytes, shorter than the disk staged in it"
        return None


def _check(name: str, actual: str, expected: tuple[str, str]) -> None:
    if actual != expected[1]:
        raise VerificationError(
            f"{name}: {expected[0].upper()} {actual} does not match the manifest's {expected[1]}"
        )


def _checked_disk(disk: StagedDisk, roots: list[Path]) -> StagedDisk:
    """`disk` once its chain is confined to `roots`."""
    confine_chain(disk.source(), roots)
    return disk


def _stage_ova(path: Path, vm: VMInfo, roots: list[Path]) -> StagedVM:
    members = ova.read_members(path)
    descriptor_name = next(name for name in members if name.endswith(".ovf"))
    descriptor = parse_ovf(ova.read_member(path, members[descriptor_name]))
    manifest_name = next((name for name in members if name.endswith(".mf")), None)
    manifest = (parse_manifest(ova.read_member(path, members[manifest_name]).decode())
                if manifest_name else {})
    verified: dict[str, str] = {}
    if descriptor_name in manifest:
        member = members[descriptor_name]
        algorithm = manifest[descriptor_name][0]
        actual = digest_file(path, algorithm=algorithm, offset=member.offset, length=member.size)
        _check(descriptor_name, actual, manifest[descriptor_name])
        verified[descriptor_name] = actual
    sizes = {f.href: f.size for f in descriptor.files.values()}
    disks = []
    for disk in vm.disks:
        if not disk.file or disk.file not in members:
            raise VerificationError(f"{path.name}: disk file {disk.file!r} is not in the archive")
        member = members[disk.file]
        if sizes.get(disk.file) not in (None, member.size):
            raise VerificationError(f"{disk.file}: {member.size} bytes, the OVF says "
                                    f"{sizes[disk.file]}")
        expected = manifest.get(disk.file)
        fmt = checked_format(path, claimed=claimed_format(disk.file), offset=member.offset,
                             size=member.size, name=f"{path.name}:{disk.file}")
        disks.append(_checked_disk(StagedDisk(
            disk=disk, path=path, format=fmt, offset=member.offset, size=member.size,
            algorithm=expected[0] if expected else None, digest=expected[1] if expected else None,
        ), roots))
    return StagedVM(vm=vm, disks=disks, verified=verified)


def _stage_files(export: ExportResult, roots: list[Path]) -> StagedVM:
    vm = export.vm
    by_name = {f.path.name: f for f in export.files}
    manifest_file = next((f for f in export.files if f.role == "manifest"), None)
    manifest = parse_manifest(manifest_file.path.read_text()) if manifest_file else {}
    verified: dict[str, str] = {}
    descriptor = next((f for f in export.files if f.role == "ovf"), None)
    sizes: dict[str, int | None] = {}
    if descriptor:
        sizes = {f.href: f.size for f in parse_ovf(descriptor.path.read_bytes()).files.values()}
        if descriptor.path.name in manifest:
            expected = manifest[descriptor.path.name]
            actual = digest_file(descriptor.path, algorithm=expected[0])
            _check(descriptor.path.name, actual, expected)
            verified[descriptor.path.name] = actual
    disk_files = [f for f in export.files if f.role == "disk"]
    disks = []
    for index, disk in enumerate(vm.disks):
        exported = by_name.get(disk.file or "") or (
            disk_files[index] if index < len(disk_files) else None)
        if exported is None or not exported.path.is_file():
            raise VerificationError(f"disk file {disk.file!r} was not exported")
        size = exported.path.stat().st_size
        if size != exported.size or sizes.get(exported.path.name) not in (None, size):
            raise VerificationError(f"{exported.path.name}: {size} bytes, expected "
                                    f"{sizes.get(exported.path.name) or exported.size}")
        checksum = manifest.get(exported.path.name) or (
            ("sha256", exported.sha256) if exported.sha256 else None)
        fmt = checked_format(exported.path, claimed=claimed_format(exported.path.name))
        disks.append(_checked_disk(StagedDisk(
            disk=disk, path=exported.path, format=fmt, size=size,
            algorithm=checksum[0] if checksum else None, digest=checksum[1] if checksum else None,
        ), roots))
    return StagedVM(vm=vm, disks=disks, verified=verified)


def stage_export(export: ExportResult, roots: list[Path]) -> StagedVM:
    """Stage what an export wrote (an OVA, an OVF with its files, or bare disks); every
    disk must read only files inside `roots`."""
    container = next((f for f in export.files if f.role == "ova"), None)
    staged = (_stage_ova(container.path, export.vm, roots) if container
              else _stage_files(export, roots))
    if not staged.disks:
        raise VerificationError(f"{export.vm.name}: the export holds no disk to convert")
    return staged


def describe_disk(source: Path) -> DiskInfo:
    """A bare disk image: its format, checked against its name, and its virtual size, read
    from the file itself for raw and VMDK (no qemu-img process), by qemu-img otherwise."""
    fmt = checked_format(source, claimed=claimed_format(source.name))
    if fmt == "raw":
        capacity = source.stat().st_size
    elif fmt == "vmdk":
        capacity = parse_vmdk(source).capacity_bytes
    else:
        capacity = qemu_img.info(DiskSource(source, fmt))["virtual-size"]
    # the blocks the file holds: a raw disk's data, a lower bound for a compressed one
    allocated = min(capacity, source.stat().st_blocks * 512)
    return DiskInfo(name="disk1", capacity_bytes=capacity, allocated_bytes=allocated,
                    format=fmt, file=source.name)


def describe_source(source: Path) -> ExportResult:
    """An OVA, an OVF descriptor or a disk image on disk, as if it had just been exported."""
    if not source.is_file():
        raise InvalidRequest(f"{source} is not a file")
    if source.suffix == ".ova":
        members = ova.read_members(source)
        descriptor = next(m for name, m in members.items() if name.endswith(".ovf"))
        vm = parse_ovf(ova.read_member(source, descriptor)).vm
        files = [ExportedFile(path=source, size=source.stat().st_size, role="ova")]
        return ExportResult(vm=vm, directory=source.parent, files=files, method="ova")
    if source.suffix == ".ovf":
        vm = parse_ovf(source.read_bytes()).vm
        files = [ExportedFile(path=source, size=source.stat().st_size, role="ovf")]
        for disk in vm.disks:
            if not disk.file:
                continue
            # a file the descriptor names stays in its folder, as a VMDK's extents do
            path = confine(disk.file, source.parent, what=f"{source.name}: file")
            if path.is_file():
                files.append(ExportedFile(path=path, size=path.stat().st_size, role="disk"))
        manifest = source.with_suffix(".mf")
        if manifest.is_file():
            files.append(ExportedFile(path=manifest, size=manifest.stat().st_size,
                                      role="manifest"))
        return ExportResult(vm=vm, directory=source.parent, files=files, method="ovf")
    name = source.stem
    vm = VMInfo(identifier=name, name=name, provider="local", disks=[describe_disk(source)])
    files = [ExportedFile(path=source, size=source.stat().st_size, role="disk")]
    return ExportResult(vm=vm, directory=source.parent, files=files, method="vmdk")
