"""Laying fetched disks out as the export method asks, for every provider that fetches
disks itself: bare disks, bare VMDKs, an OVF folder (our descriptor from the VM's
hardware + manifest beside the disks) or one OVA."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.errors import HypersdkError
from core.files import partial_path
from core.models import ExportedFile, ExportOptions, VMInfo
from hyper2kvm import ova, qemu_img
from hyper2kvm.manifest import digest_file, render_manifest
from hyper2kvm.ovf import render_ovf, vmdk_format_uri
from providers.ranged import forget_resume_marks, keep_for_retry

RAW = "raw"  # FetchedDisk.create_type of a raw disk image
QCOW2 = "qcow2"  # ... of a qcow2 image (a cloud's image export)
VHDX = "vhdx"  # ... of a Hyper-V VHDX
VHD = "vpc"  # ... of a Hyper-V VHD (qemu-img's name for the format)
_NOT_VMDK = (RAW, QCOW2, VHDX, VHD)


class File(Protocol):
    """A finished file and its SHA-256 (a download, a ranged read, a conversion)."""

    @property
    def path(self) -> Path: ...
    @property
    def size(self) -> int: ...
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class Hashed:
    path: Path
    size: int
    sha256: str


@dataclass
class FetchedDisk:
    """One disk as it arrived: its main file (what qemu-img opens) and any extents."""

    main: File
    create_type: str  # a VMDK's create type as its descriptor says, or RAW, QCOW2, VHDX, VHD
    extents: list[File] = field(default_factory=list)

    @property
    def single_file(self) -> bool:
        return not self.extents


def _exported(path: Path, sha256: str, role: str) -> ExportedFile:
    return ExportedFile(path=path, size=path.stat().st_size, sha256=sha256,
                        role=role)  # type: ignore[arg-type]


def _format(create_type: str) -> str:
    """The qemu-img format of a fetched disk."""
    return create_type if create_type in _NOT_VMDK else "vmdk"


def _stream_optimized(disk: FetchedDisk) -> Hashed:
    """The disk as one stream-optimized (compressed) VMDK, the OVF disk format of
    vSphere's own exports, in place of the files it was fetched as."""
    source = disk.main.path
    final = source.with_suffix(".vmdk")
    partial = partial_path(final.with_name(f"{final.stem}-stream.vmdk"))
    try:
        qemu_img.convert(qemu_img.DiskSource(source, _format(disk.create_type)),
                         partial, output_format="vmdk", subformat="streamOptimized")
        for old in (disk.main, *disk.extents):
            old.path.unlink()
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return Hashed(path=final, size=final.stat().st_size, sha256=digest_file(final))


def package(vm: VMInfo, fetched: list[FetchedDisk], dest: Path, *, method: str,
            options: ExportOptions, written: list[Path]) -> tuple[VMInfo, list[ExportedFile]]:
    """Lay the fetched disks out as `method` asks: as fetched (`disks`), bare VMDKs, an
    OVF folder or one OVA. A raw disk becomes a stream-optimized VMDK unless the method
    is `disks`; so does any disk with `compress`, and for an OVA any disk of several
    files; a qcow2, VHDX or VHD disk as a raw one. Files made here are added to `written` (removed
    again if the export fails)."""
    disks: list[File] = []
    create_types: list[str] = []
    others: list[File] = []
    for disk in fetched:
        stream = disk.create_type.lower() == "streamoptimized"
        not_vmdk = disk.create_type in _NOT_VMDK
        if method != "disks" and (not_vmdk or (options.compress and not stream)
                                  or (method == "ova" and not disk.single_file)):
            converted = _stream_optimized(disk)
            written.append(converted.path)
            disks.append(converted)
            create_types.append("streamOptimized")
        else:
            disks.append(disk.main)
            create_types.append(disk.create_type)
            others.extend(disk.extents)
    exported = vm.model_copy(update={"disks": [
        d.model_copy(update={"file": f.path.name, "format": _format(kind)})
        for d, f, kind in zip(vm.disks, disks, create_types, strict=True)]})
    if method in ("vmdk", "disks"):
        return exported, ([_exported(d.path, d.sha256, "disk") for d in disks]
                          + [_exported(e.path, e.sha256, "other") for e in others])

    descriptor = dest / f"{vm.name}.ovf"
    written.append(descriptor)
    descriptor.write_text(render_ovf(
        exported, [(d.path.name, d.size) for d in disks],
        include_cdrom=not options.remove_cdrom,
        formats=[vmdk_format_uri(kind) for kind in create_types]))
    ovf_digest = digest_file(descriptor)
    manifest = dest / f"{vm.name}.mf"
    written.append(manifest)
    manifest.write_text(render_manifest(
        [(descriptor.name, ovf_digest)] + [(f.path.name, f.sha256) for f in (*disks, *others)]))
    parts = [_exported(descriptor, ovf_digest, "ovf"),
             *[_exported(d.path, d.sha256, "disk") for d in disks],
             *[_exported(e.path, e.sha256, "other") for e in others],
             _exported(manifest, digest_file(manifest), "manifest")]
    if method == "ovf":
        return exported, parts
    target = dest / f"{vm.name}.ova"
    written.append(target)
    ova.write_ova(target, [p.path for p in parts])
    for part in parts:
        part.path.unlink()
    return exported, [_exported(target, digest_file(target), "ova")]


def export_disks(vm: VMInfo, dest: Path, *, method: str, options: ExportOptions,
                 fetch: Callable[[list[Path]], list[FetchedDisk]],
                 map_error: Callable[[BaseException, str], HypersdkError]) -> tuple[
        VMInfo, list[ExportedFile]]:
    """Fetch the VM's disks under `dest` (`fetch` appends every file it starts to the list
    it is given) and package them as `method`. On any failure or cancellation every file
    either wrote is removed (a transient failure's finished reads are kept for the retry,
    under their partial names), and errors that are not hypersdk's go through `map_error`."""
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        fetched = fetch(written)
        exported = package(vm, fetched, dest, method=method, options=options, written=written)
    except BaseException as exc:
        keep_for_retry(written, exc)
        if isinstance(exc, Exception) and not isinstance(exc, HypersdkError):
            raise map_error(exc, f"export {vm.name}") from exc
        raise
    forget_resume_marks(written)
    return exported
