"""GCP instances as the shared models: listed across zones (one aggregated list, or the
configured zones), one instance's hardware from its machine type, its disks (boot disk
first, then by index) and network interfaces. GCP exposes no MAC addresses: each NIC gets
one derived from the instance id and its index, the same on every migration of that VM,
and marked `mac_derived`."""

from __future__ import annotations

import hashlib
from typing import Any

from core.errors import NotFound
from core.models import DiskInfo, NicInfo, PowerState, VMFilter, VMInfo, VMSummary
from providers.gcp.session import Clients, call

RUNNING = {"RUNNING", "PROVISIONING", "STAGING", "REPAIRING"}
_ARCHITECTURES = {"X86_64": "x86_64", "ARM64": "arm64"}


def last(url: str | None) -> str:
    """The last part of a resource URL (zones/us-east1-b → us-east1-b)."""
    return (url or "").rsplit("/", 1)[-1]


def derived_mac(instance_id: int | str, index: int) -> str:
    """A stable locally administered MAC in QEMU's 52:54:00 range for NIC `index`."""
    digest = hashlib.sha256(f"gcp:{instance_id}:{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _summary_fields(instance: Any) -> dict[str, Any]:
    zone = last(instance.zone)
    return {
        "identifier": f"{zone}/{instance.name}", "name": instance.name, "provider": "gcp",
        "power_state": (PowerState.POWERED_ON if instance.status in RUNNING
                        else PowerState.POWERED_OFF),
        "datacenter": zone, "folder": None,
        "tags": [f"{k}={v}" if v else k for k, v in sorted(dict(instance.labels).items())],
    }


def _all_instances(clients: Clients) -> list[Any]:
    instances = clients.instances
    project = clients.project
    if clients.config.zones:
        def in_zone(zone: str) -> list[Any]:
            return call(lambda: list(instances.list(project=project, zone=zone)),
                        f"GCP instances in {zone}")

        return [i for zone in clients.config.zones for i in in_zone(zone)]
    pages = call(lambda: list(instances.aggregated_list(project=project)),
                 f"GCP instances of {project}")
    return [i for _, scoped in pages for i in scoped.instances]


def list_vms(clients: Clients, vm_filter: VMFilter) -> list[VMSummary]:
    found = [VMSummary(**_summary_fields(i)) for i in _all_instances(clients)]
    return [vm for vm in found if vm_filter.matches(vm)]


def find_instance(clients: Clients, identifier: str) -> Any:
    """An instance by `zone/name`, by its numeric id, or by name when only one zone has it."""
    if identifier.count("/") == 1:
        zone, name = identifier.split("/")
        return call(lambda: clients.instances.get(project=clients.project, zone=zone,
                                                  instance=name),
                    f"GCP instance {identifier}")
    matches = [i for i in _all_instances(clients)
               if identifier in (i.name, str(i.id))]
    if not matches:
        raise NotFound(f"GCP: no instance {identifier!r} in project {clients.project} (give "
                       "zone/name, or a name only one zone has)")
    if len(matches) > 1:
        zones = ", ".join(last(i.zone) for i in matches)
        raise NotFound(f"GCP: {len(matches)} instances are named {identifier!r} ({zones}); "
                       "give zone/name")
    return matches[0]


def _machine_type(clients: Clients, zone: str, url: str) -> Any:
    return call(lambda: clients.machine_types.get(project=clients.project, zone=zone,
                                                  machine_type=last(url)),
                f"GCP machine type {last(url)}")


def _boot_disk_uefi(clients: Clients, zone: str, attached: Any) -> tuple[bool, str | None]:
    """(UEFI, architecture) from the boot disk's guest OS features."""
    features = {f.type_ for f in attached.guest_os_features}
    disk = call(lambda: clients.disks.get(project=clients.project, zone=zone,
                                          disk=last(attached.source)),
                f"GCP disk {last(attached.source)}")
    features |= {f.type_ for f in disk.guest_os_features}
    return "UEFI_COMPATIBLE" in features, _ARCHITECTURES.get(disk.architecture or "")


LOCAL_SSD_GB = 375  # what one local SSD holds, where the API leaves the size out


def vm_info(clients: Clients, instance: Any) -> VMInfo:
    zone = last(instance.zone)
    machine = _machine_type(clients, zone, instance.machine_type)
    attached = sorted(instance.disks, key=lambda d: (not d.boot, d.index))
    if not attached or not attached[0].boot:
        raise NotFound(f"GCP instance {instance.name}: it has no boot disk")
    uefi, architecture = _boot_disk_uefi(clients, zone, attached[0])
    shielded = instance.shielded_instance_config
    secure_boot = bool(shielded and shielded.enable_secure_boot)
    disks = [DiskInfo(name=last(d.source) or d.device_name,
                      capacity_bytes=int(d.disk_size_gb or LOCAL_SSD_GB) << 30, format="raw",
                      controller="nvme" if d.interface == "NVME" else "scsi",
                      unit=d.index, datastore=d.source or None, local=d.type_ == "SCRATCH")
             for d in attached]
    nics = [NicInfo(mac=derived_mac(instance.id, index), mac_derived=True,
                    network=last(nic.network), ip_address=nic.network_i_p or None)
            for index, nic in enumerate(instance.network_interfaces)]
    guest = "windows" if any("windows" in license_.lower() for d in attached
                             for license_ in d.licenses) else "linux"
    return VMInfo(**_summary_fields(instance), cpus=machine.guest_cpus,
                  memory_mb=machine.memory_mb, firmware="efi" if uefi or secure_boot else "bios",
                  secure_boot=secure_boot, guest_os=guest,
                  architecture=architecture or _ARCHITECTURES.get(machine.architecture or ""),
                  disks=disks, nics=nics)
