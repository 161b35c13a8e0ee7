"""The local provider: VMs are OVAs, OVF folders and disk images in one directory."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from core.config import LocalProviderConfig
from core.errors import InvalidRequest, NotFound, PathNotAllowed
from core.files import link_or_copy
from core.models import (
    ExportedFile,
    ExportOptions,
    ExportResult,
    VMFilter,
    VMInfo,
    VMSummary,
)
from core.paths import confine
from hyper2kvm import ova, qemu_img
from hyper2kvm.chain import confine_chain
from hyper2kvm.detect import CLAIMED_BY_SUFFIX
from hyper2kvm.output import OutputImage
from hyper2kvm.ovf import parse_ovf, write_descriptor
from hyper2kvm.qemu_img import DiskSource
from hyper2kvm.staging import describe_disk
from hyper2kvm.sync import read_only, sync_into
from providers.base import BytesProgress, ExportMethod, Provider, WarmRound

# extents and deltas of a VMDK are parts of another disk, not VMs of their own
_VMDK_PART = re.compile(r"-(flat|delta|s\d{3}|f\d{3})\.vmdk$")


def _role(path: Path) -> str:
    return {".ovf": "ovf", ".mf": "manifest", ".ova": "ova"}.get(
        path.suffix, "disk" if path.suffix in CLAIMED_BY_SUFFIX else "other"
    )


def _described(source: Path) -> VMInfo | None:
    """The VM an OVA, an OVF file or an OVF folder describes; None for a bare disk."""
    if source.suffix == ".ova":
        members = ova.read_members(source)
        descriptor = next(m for name, m in members.items() if name.endswith(".ovf"))
        return parse_ovf(ova.read_member(source, descriptor)).vm
    if source.suffix == ".ovf":
        return parse_ovf(source.read_bytes()).vm
    if source.is_dir():
        return parse_ovf(next(source.glob("*.ovf")).read_bytes()).vm
    return None


class LocalProvider(Provider):
    name = "local"
    config: LocalProviderConfig

    @property
    def root(self) -> Path:
        return self.config.path

    def _sources(self) -> dict[str, Path]:
        """identifier → the OVA, OVF folder or disk it names."""
        found: dict[str, Path] = {}
        if not self.root.is_dir():
            return found
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and any(entry.glob("*.ovf")):
                found[entry.name] = entry
            elif (entry.is_file() and (entry.suffix == ".ova" or entry.suffix in CLAIMED_BY_SUFFIX)
                  and not _VMDK_PART.search(entry.name)):
                found.setdefault(entry.stem, entry)
        return found

    def _source(self, identifier: str) -> Path:
        """The VM's OVA, folder or disk, resolved: a symlink may point anywhere inside the
        inbox, never outside it (nor may any file of an OVF folder)."""
        source = self._sources().get(identifier)
        if source is None:
            raise NotFound(f"no VM {identifier!r} in {self.root}")
        resolved = confine(source, self.root, what=f"inbox entry {source.name!r}")
        if resolved.is_dir():
            for file in resolved.iterdir():
                confine(file, self.root, what=f"{source.name}/{file.name}")
        return resolved

    def _usable(self, identifier: str) -> bool:
        try:
            self._source(identifier)
        except PathNotAllowed:
            return False
        return True

    def check(self) -> None:
        """The inbox is a folder this process can list."""
        if not self.root.is_dir() or not os.access(self.root, os.R_OK | os.X_OK):
            raise NotFound(f"the local inbox {self.root} is not a readable folder")

    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        summaries = [
            VMSummary(identifier=identifier, name=identifier, provider=self.name)
            for identifier in self._sources() if self._usable(identifier)
        ]
        return [vm for vm in summaries if vm_filter.matches(vm)]

    def get_vm(self, identifier: str) -> VMInfo:
        source = self._source(identifier)
        described = _described(source)
        if described:
            vm = described
        else:
            vm = VMInfo(identifier=identifier, name=identifier, provider=self.name,
                        disks=[describe_disk(source)])
        return vm.model_copy(update={"identifier": identifier, "provider": self.name})

    def check_export(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> None:
        if options.warm and not self._bare_disk(vm.identifier):
            raise InvalidRequest(f"a warm migration of a local VM reads a disk image as it "
                                 f"changes; {vm.identifier!r} is an OVA or OVF folder")

    def _bare_disk(self, identifier: str) -> Path | None:
        """The VM's disk image, if it is one, every file it makes qemu read (backing
        chain, extents, data file) confined to the inbox."""
        source = self._source(identifier)
        if not source.is_file() or source.suffix == ".ova":
            return None
        confine_chain(DiskSource(source, describe_disk(source).format), [self.root])
        return source

    def warm_round(
        self,
        identifier: str,
        outputs: list[OutputImage],
        *,
        options: ExportOptions,
        final: bool,
        progress: BytesProgress | None = None,
        job: str | None = None,
    ) -> WarmRound:
        """The image compared with the copy block by block (it reports no changed blocks
        of its own); read while a VM may write it, so exact only once it stops (final)."""
        source = self._bare_disk(identifier)
        if source is None or len(outputs) != 1:
            raise InvalidRequest(f"{identifier!r} is not a single disk image")
        with read_only(source, describe_disk(source).format) as disk:
            return WarmRound(sync_into(disk, outputs[0], progress=progress))

    def export(
        self,
        identifier: str,
        dest: Path,
        *,
        method: ExportMethod,
        options: ExportOptions,
        progress: BytesProgress | None = None,
        job: str | None = None,
    ) -> ExportResult:
        source = self._source(identifier)
        vm = self.get_vm(identifier)
        dest.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        try:
            linked = self._export_into(source, vm, dest, method, options, progress, written)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        # what was written, as its own descriptor tells (a packaged disk is a VMDK now)
        container = next((p for p in written if p.suffix in (".ova", ".ovf")), None)
        exported = _described(container) if container else None
        if exported:
            vm = exported.model_copy(update={"identifier": identifier, "provider": self.name})
        files = [
            ExportedFile(path=path, size=path.stat().st_size, role=_role(path))  # type: ignore[arg-type]
            for path in written
        ]
        return ExportResult(vm=vm, directory=dest, files=files, method=method, linked=linked)

    def _export_into(
        self,
        source: Path,
        vm: VMInfo,
        dest: Path,
        method: ExportMethod,
        options: ExportOptions,
        progress: BytesProgress | None,
        written: list[Path],
    ) -> bool:
        """Fill `dest`, appending each finished file to `written`; True if all linked."""
        if method == "disks":  # as the source already is: linked, nothing repackaged
            method = "ova" if source.suffix == ".ova" else "ovf" if source.is_dir() else "vmdk"
        if source.suffix == ".ova":
            if method == "ova":
                target = dest / source.name
                written.append(target)
                return link_or_copy(source, target, progress=progress)
            members = ova.read_members(source)
            for name, member in members.items():
                if method == "vmdk" and _role(Path(name)) != "disk":
                    continue
                target = dest / name
                written.append(target)
                ova.extract_member(source, member, target, progress)
            return False
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.is_file())
            if method == "ova":
                target = dest / f"{source.name}.ova"
                written.append(target)
                ova.write_ova(target, files, progress)
                return False
            linked = True
            for file in files:
                if method == "vmdk" and _role(file) != "disk":
                    continue
                written.append(dest / file.name)
                linked &= link_or_copy(file, dest / file.name, progress=progress)
            return linked
        if method == "vmdk":
            written.append(dest / source.name)
            return link_or_copy(source, dest / source.name, progress=progress)
        self._package_disk(source, vm, dest, method, options, progress, written)
        return False

    def _package_disk(
        self,
        source: Path,
        vm: VMInfo,
        dest: Path,
        method: ExportMethod,
        options: ExportOptions,
        progress: BytesProgress | None,
        written: list[Path],
    ) -> None:
        """A bare disk exported as OVF/OVA: a streamOptimized VMDK, a descriptor, a manifest."""
        # named like a partial file, so a cancelled job's cleanup finds it
        with tempfile.TemporaryDirectory(dir=dest, prefix=".export-", suffix=".partial") as work:
            staging = Path(work)
            vmdk = staging / f"{vm.name}-disk1.vmdk"
            capacity = vm.disks[0].capacity_bytes

            qemu_img.convert(
                qemu_img.DiskSource(source, vm.disks[0].format), vmdk,
                output_format="vmdk", subformat="streamOptimized",
                progress=qemu_img.bytes_progress(capacity, progress) if progress else None,
            )
            parts = write_descriptor(staging, vm, [vmdk],
                                     include_cdrom=not options.remove_cdrom)
            if method == "ova":
                target = dest / f"{vm.name}.ova"
                written.append(target)
                ova.write_ova(target, parts)
            else:
                for part in parts:
                    written.append(dest / part.name)
                    os.replace(part, dest / part.name)
