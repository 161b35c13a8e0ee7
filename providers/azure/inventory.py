"""Azure VMs as the shared models: listed with their instance views, one VM's hardware
from its size, managed disks (OS disk, then data disks by LUN) and network interfaces."""

from __future__ import annotations

import re
from typing import Any

from core.errors import NotFound
from core.models import DiskInfo, NicInfo, PowerState, VMFilter, VMInfo, VMSummary
from providers.azure.session import Clients, call

_ID = re.compile(r"/resourceGroups/(?P<rg>[^/]+)/providers/[^/]+/[^/]+/(?P<name>[^/]+)$",
                 re.IGNORECASE)


def parse_id(resource_id: str) -> tuple[str, str]:
    """(resource group, name) of an ARM resource id."""
    match = _ID.search(resource_id)
    if not match:
        raise NotFound(f"Azure: not a resource id: {resource_id!r}")
    return match.group("rg"), match.group("name")


def power_state(vm: Any) -> PowerState:
    """From the instance view: running (or starting) is on; stopped, deallocated off."""
    view = vm.properties.instance_view if vm.properties else None
    statuses = (view.statuses if view else None) or []
    codes = [s.code for s in statuses if s.code and s.code.startswith("PowerState/")]
    state = codes[0].split("/", 1)[1] if codes else "unknown"
    return PowerState.POWERED_ON if state in ("running", "starting") else PowerState.POWERED_OFF


def enum_text(value: Any) -> str:
    """An SDK enum's wire value ('V2', 'Linux', 'x64'), or the string it is."""
    return str(getattr(value, "value", value) or "")


def _summary_fields(vm: Any) -> dict[str, Any]:
    group, name = parse_id(vm.id)
    return {
        "identifier": f"{group}/{name}", "name": name, "provider": "azure",
        "power_state": power_state(vm), "datacenter": vm.location, "folder": group,
        "tags": [f"{k}={v}" if v else k for k, v in sorted((vm.tags or {}).items())],
    }


def _all_vms(clients: Clients) -> list[Any]:
    groups = clients.config.resource_groups
    compute = clients.compute.virtual_machines
    if groups:
        return [vm for group in groups
                for vm in call(lambda g=group: list(compute.list(g, expand="instanceView")),
                               f"Azure VMs of {group}")]
    return call(lambda: list(compute.list_all(expand="instanceView")), "Azure VMs")


def list_vms(clients: Clients, vm_filter: VMFilter) -> list[VMSummary]:
    found = [VMSummary(**_summary_fields(vm)) for vm in _all_vms(clients)]
    return [vm for vm in found if vm_filter.matches(vm)]


def find_vm(clients: Clients, identifier: str) -> Any:
    """A VM by `group/name`, by resource id, or by name when only one VM has it."""
    if identifier.startswith("/subscriptions/"):
        group, name = parse_id(identifier)
    elif identifier.count("/") == 1:
        group, name = identifier.split("/")
    else:
        matches = [vm for vm in _all_vms(clients) if vm.name == identifier]
        if not matches:
            raise NotFound(f"Azure: no VM {identifier!r} (give group/name, its resource id, "
                           "or a name only one VM has)")
        if len(matches) > 1:
            where = ", ".join(parse_id(vm.id)[0] for vm in matches)
            raise NotFound(f"Azure: {len(matches)} VMs are named {identifier!r} ({where}); "
                           "give group/name")
        group, name = parse_id(matches[0].id)
    return call(clients.compute.virtual_machines.get, f"Azure VM {group}/{name}", group, name,
                expand="instanceView")


def _size(clients: Clients, location: str, size: str) -> tuple[int, int]:
    """vCPUs and MiB of a VM size, from Resource SKUs: the VM sizes list is deprecated and
    leaves out sizes retired or closed to new VMs, which running VMs may still have."""
    skus = call(lambda: list(clients.compute.resource_skus.list(
        filter=f"location eq '{location}'")), f"Azure resource SKUs in {location}")
    for sku in skus:
        if sku.resource_type == "virtualMachines" and (sku.name or "").lower() == size.lower():
            capabilities = {c.name: c.value for c in sku.capabilities or []}
            try:
                return (int(capabilities["vCPUs"]),
                        round(float(capabilities["MemoryGB"]) * 1024))
            except (KeyError, TypeError, ValueError):
                break
    raise NotFound(f"Azure: VM size {size} is not described in {location}'s resource SKUs")


def disks_of(vm: Any) -> list[tuple[str, int | None]]:
    """(managed disk id, LUN) of the OS disk, then of the data disks by LUN."""
    storage = vm.properties.storage_profile
    if storage.os_disk.managed_disk is None:
        raise NotFound(f"Azure VM {vm.name}: its OS disk is not a managed disk")
    disks: list[tuple[str, int | None]] = [(storage.os_disk.managed_disk.id, None)]
    for data in sorted(storage.data_disks or [], key=lambda d: d.lun):
        if data.managed_disk is not None:
            disks.append((data.managed_disk.id, data.lun))
    return disks


def vm_info(clients: Clients, vm: Any) -> VMInfo:
    props = vm.properties
    cpus, memory = _size(clients, vm.location, props.hardware_profile.vm_size)
    disks: list[DiskInfo] = []
    generation = architecture = None
    for index, (disk_id, lun) in enumerate(disks_of(vm)):
        group, name = parse_id(disk_id)
        disk = call(clients.compute.disks.get, f"Azure disk {name}", group, name).properties
        if index == 0:
            generation = disk.hyper_v_generation
            capabilities = disk.supported_capabilities
            arch = enum_text(capabilities.architecture) if capabilities else ""
            architecture = {"x64": "x86_64", "arm64": "arm64"}.get(arch.lower())
        size = disk.disk_size_bytes or (disk.disk_size_gb or 0) << 30
        disks.append(DiskInfo(name=name, capacity_bytes=size, format="raw", controller="scsi",
                              unit=0 if lun is None else lun + 1, datastore=disk_id))
    nics: list[NicInfo] = []
    references = sorted(props.network_profile.network_interfaces or [],
                        key=lambda n: not (n.properties and n.properties.primary))
    for reference in references:
        group, name = parse_id(reference.id)
        nic = call(clients.network.network_interfaces.get, f"Azure NIC {name}", group,
                   name).properties
        first = (nic.ip_configurations or [None])[0]
        address = first.properties if first is not None else None
        nics.append(NicInfo(
            mac=nic.mac_address, adapter="netvsc",
            network=address.subnet.id.rsplit("/", 1)[-1] if address and address.subnet
            else None,
            ip_address=address.private_ip_address if address else None))
    security = props.security_profile
    secure_boot = bool(security and security.uefi_settings
                       and security.uefi_settings.secure_boot_enabled)
    os_type = enum_text(props.storage_profile.os_disk.os_type).lower()
    return VMInfo(**_summary_fields(vm), cpus=cpus, memory_mb=memory,
                  firmware="efi" if enum_text(generation).upper() == "V2" else "bios",
                  secure_boot=secure_boot, guest_os=os_type or None,
                  architecture=architecture, disks=disks, nics=nics)
