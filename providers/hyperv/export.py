"""Getting a Hyper-V VM's disks out over SMB.

* A powered-off VM whose disks are under the share: its VHDX files read in place.
* A running VM, one with a disk the share does not reach, or `options.transport: export`:
  `Export-VM` into a staging folder on the share first (the VM may run again once it is
  done), the exported VHDX files read from there.
* A checkpointed disk (a differencing chain, which qemu-img does not read): merged on the
  host by `Convert-VHD` of its newest file into the staging folder, the current state.

Files are read as parallel ranged parts (SHA-256 in the result, byte progress); the
staging folder `hypersdk\\<job>` is removed over SMB at the end, on failure, and by
`discard` after a cancel or crash (unless `options.keep_snapshots`). The host writes into a
share on another server as its computer account (HOST$): validation proves it may, with a
small `New-VHD` there (written by the same Hyper-V services, as the same account)."""

from __future__ import annotations

import contextlib
import logging
import ntpath
import uuid
from collections.abc import Callable
from pathlib import Path

from core.errors import HypersdkError, InvalidRequest, NotFound
from core.models import Blocker, ExportedFile, ExportOptions, PowerState, VMInfo
from core.paths import safe_name
from providers.base import job_label
from providers.hyperv.inventory import VirtualDisk
from providers.hyperv.powershell import Command, Host, map_error, pipeline, vm_by_id
from providers.hyperv.share import Share
from providers.packaging import VHD, VHDX, FetchedDisk, export_disks
from providers.power import power_for_export
from providers.ranged import Reading, map_in_context

log = logging.getLogger(__name__)
STAGING = "hypersdk"


def check_exportable(options: ExportOptions, share: str | None) -> None:
    if options.transport not in ("auto", "export"):
        raise InvalidRequest(f"options.transport {options.transport!r}: Hyper-V disks are read "
                             "from the share (auto) or exported there first (export)")
    if not share:
        raise InvalidRequest("providers.hyperv.export_share is not set: the provider reads "
                             "disks over SMB from a share; name one")


def _kind(disk: VirtualDisk) -> str:
    """The disk's qemu-img format: VHDX, or a VHD's "vpc"."""
    return VHDX if disk.format == "VHDX" else VHD


def staging_folder(job: str | None) -> str:
    """The job's folder inside the share (backslashed)."""
    return f"{STAGING}\\{job_label(job)}"


def _power_calls(host: Host, vm: VMInfo) -> dict[str, Callable[[], None]]:
    def stop() -> None:
        # a guest shutdown through the integration services; -Force: no prompt
        host.run(pipeline(vm_by_id(vm.identifier), Command("Stop-VM", {"Force": True})),
                 f"Stop-VM {vm.name}")
        log.info("%s: shut down", vm.name)

    def start() -> None:
        host.run(pipeline(vm_by_id(vm.identifier), Command("Start-VM")), f"Start-VM {vm.name}")
        log.info("%s: started again", vm.name)

    return {"stop": stop, "start": start}


def host_write_blockers(host: Host, share: Share, vm: VMInfo, disks: list[VirtualDisk],
                        options: ExportOptions) -> list[Blocker]:
    """Where the export would stage on a `remote` share: whether the host, as its
    computer account, may write there. A probe VHDX is made by `New-VHD` (the Hyper-V
    services write it, as they write Export-VM's and Convert-VHD's files) and removed
    over SMB."""
    staging = _Sources(host, share, vm, disks, STAGING)
    if not share.remote or not (
            staging.needs_export(options) or any(d.differencing for d in disks)):
        return []
    probe = f".hypersdk-probe-{uuid.uuid4().hex[:12]}.vhdx"
    try:
        host.run(Command("New-VHD", {"Path": share.host_name(probe), "SizeBytes": 3 << 20,
                                     "Dynamic": True}).render(), "New-VHD (share probe)")
    except HypersdkError as exc:
        if "denied" not in str(exc).lower():
            raise
        return [Blocker(code="share_not_writable_by_host", message=(
            f"the Hyper-V host cannot write to {share.host_path}: Export-VM and Convert-VHD "
            "write there as the host's computer account (HOST$), which needs Modify on the "
            f"share and its folder ({str(exc).splitlines()[0]})"))]
    finally:
        with contextlib.suppress(HypersdkError):
            share.remove_file(probe)
    return []


def remove_staging(share: Share, folder: str) -> bool:
    """The staging folder removed over SMB (the share may be on another server, out of
    the host's reach from a WinRM session); False when there was none."""
    if not share.exists(folder):
        return False
    share.remove_tree(folder)
    log.info("staging folder %s removed from the share", folder)
    return True


class _Sources:
    """Where each disk is read from inside the share, made so by the host when needed."""

    def __init__(self, host: Host, share: Share, vm: VMInfo, disks: list[VirtualDisk],
                 folder: str) -> None:
        self.host, self.share, self.vm, self.disks, self.folder = host, share, vm, disks, folder

    def needs_export(self, options: ExportOptions) -> bool:
        off = self.vm.power_state == PowerState.POWERED_OFF or (
            self.vm.power_state == PowerState.POWERED_ON and options.shutdown_vm)
        return (options.transport == "export" or not off
                or any(self.share.relative(d.path) is None for d in self.disks))

    def export_vm(self) -> str:
        """Export-VM into the staging folder; the exported VM's disk folder."""
        target = self.share.host_name(self.folder)
        log.info("%s: Export-VM into %s", self.vm.name, target)
        self.host.run(pipeline(vm_by_id(self.vm.identifier),
                               Command("Export-VM", {"Path": target})),
                      f"Export-VM {self.vm.name}")
        return f"{self.folder}\\{self.vm.name}\\Virtual Hard Disks"

    def merged(self, index: int, source: str) -> str:
        """Convert-VHD of a differencing disk's newest file (`source`, a host path) into a
        standalone VHDX in the staging folder: the disk as the VM sees it now."""
        relative = f"{self.folder}\\disk{index}-current.vhdx"
        log.info("%s: Convert-VHD %s (a checkpoint chain) into %s", self.vm.name, source,
                 relative)
        self.host.run(Command("Convert-VHD", {
            "Path": source, "DestinationPath": self.share.host_name(relative),
            "VHDType": "Dynamic"}).render(), f"Convert-VHD {self.vm.name}")
        return relative

    def prepare(self, options: ExportOptions) -> list[tuple[str, str]]:
        """Each disk's file inside the share, after whatever the host has to do first, and
        its format."""
        exported = self.export_vm() if self.needs_export(options) else None
        sources = []
        for index, disk in enumerate(self.disks, start=1):
            name = ntpath.basename(disk.path)
            in_share = (f"{exported}\\{name}" if exported is not None
                        else self.share.relative(disk.path))
            assert in_share is not None  # needs_export covers disks outside the share
            if disk.differencing:
                in_share = self.merged(index, self.share.host_name(in_share))
            sources.append((in_share, VHDX if disk.differencing else _kind(disk)))
        return sources


def export_vm(host: Host, share: Share, vm: VMInfo, disks: list[VirtualDisk],
              reading: Reading, *, method: str, options: ExportOptions,
              job: str | None) -> tuple[VMInfo, list[ExportedFile]]:
    """Export the VM's disks under `reading.dest`; on failure nothing it wrote is left."""
    if not disks:
        raise NotFound(f"{vm.name}: no virtual hard disk to export")
    folder = staging_folder(job)
    sources = _Sources(host, share, vm, disks, folder)

    def fetch(written: list[Path]) -> list[FetchedDisk]:
        try:
            with power_for_export(vm, options, **_power_calls(host, vm)) as restore:
                staged = sources.needs_export(options) or any(d.differencing for d in disks)
                files = sources.prepare(options)
                if staged:
                    restore()  # the host's copies are made: the VM may run again

                def read(item: tuple[int, tuple[str, str]]) -> FetchedDisk:
                    index, (relative, kind) = item
                    suffix = "vhdx" if kind == VHDX else "vhd"
                    target = reading.dest / f"{safe_name(vm.name)}-disk{index}.{suffix}"
                    written.append(target)
                    return FetchedDisk(main=share.read_file(relative, target, reading),
                                       create_type=kind)

                return map_in_context(read, list(enumerate(files, start=1)),
                                      workers=reading.disk_concurrency, stop=reading.stop)
        finally:
            if options.keep_snapshots:
                log.info("staging folder %s kept on the share", folder)
            else:
                try:
                    remove_staging(share, folder)
                except Exception as exc:  # noqa: BLE001 - logged; discard tries again
                    log.warning("staging folder %s not removed: %s", folder, exc)

    return export_disks(vm, reading.dest, method=method, options=options, fetch=fetch,
                        map_error=map_error)


def discard(host: Host, share: Share, job: str) -> list[str]:
    """What the job's export left on the share (a cancel, a crash): its staging folder."""
    folder = staging_folder(job)
    return [f"{share.unc}\\{folder}"] if remove_staging(share, folder) else []
