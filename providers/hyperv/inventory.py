"""Hyper-V VMs as the shared models, from the Hyper-V cmdlets' `ConvertTo-Json` output:
Get-VM, Get-VMFirmware, Get-VMHardDiskDrive, Get-VHD, Get-VMNetworkAdapter,
Get-VMDvdDrive, Get-VMSnapshot. Windows PowerShell 5.1 writes enums as their numbers,
PowerShell 7 as their names: both are read."""

from __future__ import annotations

import ntpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import NotFound, ProviderError
from core.models import Blocker, DiskInfo, NicInfo, PowerState, VMFilter, VMInfo, VMSummary
from providers.hyperv.powershell import Command, Host, as_json, fits, vm_by_id

VM_FIELDS = ["Name", "Id", "State", "ProcessorCount", "MemoryStartup", "Generation", "Path",
             "Notes"]
_GUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Microsoft.HyperV.PowerShell enums: number -> name
_STATES = {1: "Other", 2: "Running", 3: "Off", 4: "Stopping", 6: "Saved", 9: "Paused",
           10: "Starting", 11: "Reset", 32773: "Saving", 32776: "Pausing",
           32777: "Resuming", 32779: "FastSaved", 32780: "FastSaving"}
_CONTROLLERS = {0: "IDE", 1: "SCSI", 2: "PMEM"}
_VHD_FORMATS = {2: "VHD", 3: "VHDX", 4: "VHDSet"}
_VHD_TYPES = {2: "Fixed", 3: "Dynamic", 4: "Differencing"}
_PASSTHROUGH_SIZE = re.compile(r"(\d+(?:\.\d+)?) (KB|MB|GB|TB)\b")
_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_ON_OFF = {0: "On", 1: "Off"}
_SUSPENDED = {"Saved", "Paused", "Saving", "Pausing", "FastSaved", "FastSaving"}
_OFF = {"Off", "Other"}


def enum(value: Any, names: dict[int, str]) -> str:
    return names.get(value, str(value)) if isinstance(value, int) else str(value)


def power_state(state: Any) -> PowerState:
    name = enum(state, _STATES)
    if name in _OFF:
        return PowerState.POWERED_OFF
    return PowerState.SUSPENDED if name in _SUSPENDED else PowerState.POWERED_ON


def _tags(notes: str | None) -> list[str]:
    """`key=value` lines of the VM's notes, the tags Hyper-V does not have."""
    return sorted(line.strip() for line in (notes or "").splitlines()
                  if re.fullmatch(r"[^=\s][^=]*=.*", line.strip()))


def _summary(host: Host, vm: dict[str, Any]) -> dict[str, Any]:
    return {"identifier": str(vm["Id"]), "name": vm["Name"], "provider": "hyperv",
            "power_state": power_state(vm["State"]), "folder": vm.get("Path"),
            "datacenter": host.config.host.partition(":")[0], "tags": _tags(vm.get("Notes"))}


def list_vms(host: Host, vm_filter: VMFilter) -> list[VMSummary]:
    found = host.objects(as_json(Command("Get-VM"), select=VM_FIELDS), "Get-VM")
    return [vm for vm in (VMSummary(**_summary(host, v)) for v in found)
            if vm_filter.matches(vm)]


def find_vm(host: Host, identifier: str) -> dict[str, Any]:
    """A VM by its Id (a GUID), or by its name when only one VM has it; the name compared
    as a value (-EQ), never as a wildcard pattern."""
    by = "Id" if _GUID.fullmatch(identifier) else "Name"
    where = Command("Where-Object", {"Property": by, "EQ": True, "Value": identifier})
    found = host.objects(as_json(Command("Get-VM"), where, select=VM_FIELDS),
                         f"Get-VM {identifier}")
    if not found:
        raise NotFound(f"Hyper-V: no VM {identifier!r} on {host.config.host}")
    if len(found) > 1:
        raise NotFound(f"Hyper-V: {len(found)} VMs are named {identifier!r}; give its Id")
    return found[0]


@dataclass(frozen=True)
class VirtualDisk:
    """A disk as the host has it: its drive's slot, its file and that file's chain."""

    controller: str  # IDE, SCSI
    controller_number: int
    location: int
    path: str  # the file the VM writes (the newest .avhdx of a checkpointed disk)
    size: int  # virtual size in bytes
    format: str  # VHD, VHDX, VHDSet; PassThrough: a physical disk of the host, no file
    type: str  # Fixed, Dynamic, Differencing, PassThrough
    parent: str | None

    @property
    def differencing(self) -> bool:
        return self.type == "Differencing" or bool(self.parent)


def _passthrough(drive: dict[str, Any]) -> VirtualDisk:
    """A drive backed by a physical disk of the host: its Path describes the disk ("Disk
    4 500.00 GB Bus 0 Lun 4 Target 0"); there is no file to read."""
    size = _PASSTHROUGH_SIZE.search(str(drive.get("Path") or ""))
    return VirtualDisk(
        controller=enum(drive["ControllerType"], _CONTROLLERS),
        controller_number=int(drive["ControllerNumber"]),
        location=int(drive["ControllerLocation"]),
        path=str(drive.get("Path") or f"Disk {drive['DiskNumber']}"),
        size=int(float(size.group(1)) * _UNITS[size.group(2)]) if size else 0,
        format="PassThrough", type="PassThrough", parent=None)


def _get_vhd(paths: list[str]) -> str:
    return as_json(Command("Get-VHD", {"Path": paths}),
                   select=["Path", "VhdFormat", "VhdType", "Size", "FileSize", "ParentPath"])


def _batches(items: list[str], script: Callable[[list[str]], str]) -> list[list[str]]:
    """`items` in runs whose `script` fits on cmd.exe's command line (a VM with dozens of
    disks on long paths does not fit in one)."""
    batches: list[list[str]] = []
    for item in items:
        if batches and fits(script([*batches[-1], item])):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def virtual_disks(host: Host, vm_id: str, name: str) -> list[VirtualDisk]:
    drives = host.objects(as_json(vm_by_id(vm_id), Command("Get-VMHardDiskDrive"), select=[
        "ControllerType", "ControllerNumber", "ControllerLocation", "Path", "DiskNumber"]),
        f"Get-VMHardDiskDrive {name}")
    disks = [_passthrough(d) for d in drives if d.get("DiskNumber") is not None]
    drives = [d for d in drives if d.get("DiskNumber") is None and d.get("Path")]
    vhds = [vhd for batch in _batches([str(d["Path"]) for d in drives], _get_vhd)
            for vhd in host.objects(_get_vhd(batch), f"Get-VHD {name}")]
    by_path = {str(v["Path"]).lower(): v for v in vhds}
    for drive in drives:
        vhd = by_path.get(str(drive["Path"]).lower())
        if vhd is None:
            raise ProviderError(f"{name}: Get-VHD did not describe {drive['Path']}")
        disks.append(VirtualDisk(
            controller=enum(drive["ControllerType"], _CONTROLLERS),
            controller_number=int(drive["ControllerNumber"]),
            location=int(drive["ControllerLocation"]), path=str(drive["Path"]),
            size=int(vhd["Size"]), format=enum(vhd["VhdFormat"], _VHD_FORMATS),
            type=enum(vhd["VhdType"], _VHD_TYPES), parent=vhd.get("ParentPath") or None))
    # boot order as the controllers number them: IDE 0:0 first on generation 1
    return sorted(disks, key=lambda d: (d.controller != "IDE", d.controller_number, d.location))


def _mac(value: str | None) -> str | None:
    digits = (value or "").replace("-", "").replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{12}", digits) or digits == "0" * 12:
        return None  # a dynamic MAC not yet assigned: libvirt picks one
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def _nics(host: Host, vm_id: str, name: str) -> list[NicInfo]:
    adapters = host.objects(as_json(vm_by_id(vm_id), Command("Get-VMNetworkAdapter"), select=[
        "Name", "MacAddress", "SwitchName", "IPAddresses"]), f"Get-VMNetworkAdapter {name}")
    nics = []
    for adapter in adapters:
        addresses = adapter.get("IPAddresses") or []
        v4 = [a for a in addresses if isinstance(a, str) and "." in a]
        nics.append(NicInfo(mac=_mac(adapter.get("MacAddress")),
                            network=adapter.get("SwitchName"),
                            ip_address=v4[0] if v4 else None))
    return nics


def _secure_boot(host: Host, vm_id: str, name: str) -> bool:
    firmware = host.objects(as_json(vm_by_id(vm_id), Command("Get-VMFirmware"), select=[
        "SecureBoot", "SecureBootTemplate"]), f"Get-VMFirmware {name}")
    return bool(firmware) and enum(firmware[0].get("SecureBoot"), _ON_OFF) == "On"


def _dvd_drives(host: Host, vm_id: str, name: str) -> int:
    return len(host.objects(as_json(vm_by_id(vm_id), Command("Get-VMDvdDrive"), select=[
        "ControllerNumber", "ControllerLocation", "Path"]), f"Get-VMDvdDrive {name}"))


def _checkpoints(host: Host, vm_id: str, name: str) -> list[str]:
    """Checkpoint names, parents before children."""
    found = host.objects(as_json(vm_by_id(vm_id), Command("Get-VMSnapshot"), select=[
        "Name", "ParentSnapshotName"]), f"Get-VMSnapshot {name}")
    names = {c["Name"]: c.get("ParentSnapshotName") for c in found}
    ordered: list[str] = []

    def add(checkpoint: str) -> None:
        parent = names.get(checkpoint)
        if isinstance(parent, str) and parent in names and parent not in ordered:
            add(parent)
        if checkpoint not in ordered:
            ordered.append(checkpoint)

    for checkpoint in names:
        add(checkpoint)
    return ordered


def unexportable(vm: VMInfo) -> list[Blocker]:
    """Disks Hyper-V has no file of to read: pass-through disks and VHD Sets (as
    disk_infos describes them)."""
    blockers = []
    for disk in vm.disks:
        slot = f"{disk.controller.upper()} location {disk.unit}"
        if disk.format == "passthrough":
            blockers.append(Blocker(code="passthrough_disk", message=(
                f"{vm.name}: the disk at {slot} is a pass-through disk ({disk.name}), a "
                "physical disk of the host with no virtual disk file to export: copy it into "
                "a VHDX (or detach it) first")))
        elif disk.format == "vhdset":
            path = ntpath.join(disk.datastore or "", disk.name)
            blockers.append(Blocker(code="vhd_set", message=(
                f"{vm.name}: the disk at {slot} is a VHD Set ({path}, a guest cluster's "
                "shared disk): Convert-VHD it to a VHDX first")))
    return blockers


def disk_infos(disks: list[VirtualDisk]) -> list[DiskInfo]:
    return [DiskInfo(name=d.path if d.format == "PassThrough" else ntpath.basename(d.path),
                     capacity_bytes=d.size, format=d.format.lower(),
                     controller=d.controller.lower(), unit=d.location,
                     datastore=None if d.format == "PassThrough" else ntpath.dirname(d.path))
            for d in disks]


def vm_info(host: Host, vm: dict[str, Any], disks: list[VirtualDisk]) -> VMInfo:
    vm_id, name = str(vm["Id"]), str(vm["Name"])
    generation = int(vm.get("Generation") or 1)
    return VMInfo(**_summary(host, vm), cpus=max(1, int(vm.get("ProcessorCount") or 1)),
                  memory_mb=max(1, int(vm.get("MemoryStartup") or 0) >> 20),
                  firmware="efi" if generation == 2 else "bios",
                  secure_boot=generation == 2 and _secure_boot(host, vm_id, name),
                  architecture="x86_64", disks=disk_infos(disks), nics=_nics(host, vm_id, name),
                  cdroms=_dvd_drives(host, vm_id, name),
                  snapshots=_checkpoints(host, vm_id, name))
