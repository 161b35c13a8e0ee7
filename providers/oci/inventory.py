"""OCI instances as the shared models: the compartment's instances (paged), one
instance's hardware from its shape configuration, launch options and platform
configuration, its boot volume and block volumes, and its VNICs with their MACs."""

from __future__ import annotations

import functools
from typing import Any

from core.errors import NotFound
from core.models import DiskInfo, NicInfo, PowerState, VMFilter, VMInfo, VMSummary
from providers.oci.session import Clients, call

GONE = {"TERMINATED", "TERMINATING"}
RUNNING = {"RUNNING", "STARTING", "PROVISIONING"}


def all_pages(method: Any, what: str, **kwargs: Any) -> list[Any]:
    """Every page of a list call, on the client's own retry strategy (the SDK's pagination
    helper wraps each page in its default strategy, minutes on an unreachable endpoint)."""
    found: list[Any] = []
    arguments = dict(kwargs)
    while True:
        answer = call(functools.partial(method, **arguments), what)
        found += answer.data
        if not answer.next_page:
            return found
        arguments = {**kwargs, "page": answer.next_page}


def _get(method: Any, ocid: str, what: str) -> Any:
    return call(lambda: method(ocid).data, f"{what} {ocid}")


def _summary_fields(instance: Any) -> dict[str, Any]:
    return {
        "identifier": instance.id, "name": instance.display_name, "provider": "oci",
        "power_state": (PowerState.POWERED_ON if instance.lifecycle_state in RUNNING
                        else PowerState.POWERED_OFF),
        "datacenter": instance.availability_domain, "folder": None,
        "tags": [f"{k}={v}" if v else k
                 for k, v in sorted((instance.freeform_tags or {}).items())],
    }


def _instances(clients: Clients) -> list[Any]:
    found = all_pages(clients.compute.list_instances, "OCI instances",
                 compartment_id=clients.compartment)
    return [i for i in found if i.lifecycle_state not in GONE]


def list_vms(clients: Clients, vm_filter: VMFilter) -> list[VMSummary]:
    found = [VMSummary(**_summary_fields(i)) for i in _instances(clients)]
    return [vm for vm in found if vm_filter.matches(vm)]


def find_instance(clients: Clients, identifier: str) -> Any:
    """An instance by OCID, or by display name when only one instance has it."""
    if identifier.startswith("ocid1.instance."):
        return call(lambda: clients.compute.get_instance(identifier).data,
                    f"OCI instance {identifier}")
    matches = [i for i in _instances(clients) if i.display_name == identifier]
    if not matches:
        raise NotFound(f"OCI: no instance {identifier!r} in compartment {clients.compartment} "
                       "(give its OCID, or a name only one instance has)")
    if len(matches) > 1:
        raise NotFound(f"OCI: {len(matches)} instances are named {identifier!r}; give the OCID")
    return matches[0]


def _cpus_and_memory(instance: Any) -> tuple[int, int]:
    """vCPUs (an x86 OCPU is 2 vCPUs, an Ampere one 1) and memory in MiB."""
    shape = instance.shape_config
    if shape is None:
        raise NotFound(f"OCI instance {instance.display_name}: no shape configuration")
    arm = ".A1." in instance.shape or ".A2." in instance.shape
    cpus = shape.vcpus or int((shape.ocpus or 1) * (1 if arm else 2))
    return cpus, int((shape.memory_in_gbs or 1) * 1024)


def block_volumes(clients: Clients, instance: Any) -> list[Any]:
    """The instance's attached block volumes' attachments (the boot volume is not one)."""
    attachments = all_pages(clients.compute.list_volume_attachments, "OCI volume attachments",
                       compartment_id=instance.compartment_id, instance_id=instance.id)
    return [a for a in attachments if a.lifecycle_state == "ATTACHED"]


def _disks(clients: Clients, instance: Any) -> list[DiskInfo]:
    boots = all_pages(clients.compute.list_boot_volume_attachments, "OCI boot volume attachments",
                 availability_domain=instance.availability_domain,
                 compartment_id=instance.compartment_id, instance_id=instance.id)
    if not boots:
        raise NotFound(f"OCI instance {instance.display_name}: no boot volume attached")
    boot = _get(clients.blockstorage.get_boot_volume, boots[0].boot_volume_id,
                "OCI boot volume")
    disks = [DiskInfo(name=boot.display_name, capacity_bytes=int(boot.size_in_gbs) << 30,
                      format="raw", controller="scsi", unit=0, datastore=boot.id)]
    for index, attachment in enumerate(block_volumes(clients, instance), start=1):
        volume = _get(clients.blockstorage.get_volume, attachment.volume_id, "OCI volume")
        disks.append(DiskInfo(name=volume.display_name,
                              capacity_bytes=int(volume.size_in_gbs) << 30, format="raw",
                              controller="scsi", unit=index, datastore=volume.id))
    return disks


def _nics(clients: Clients, instance: Any) -> list[NicInfo]:
    attachments = all_pages(clients.compute.list_vnic_attachments, "OCI VNIC attachments",
                       compartment_id=instance.compartment_id, instance_id=instance.id)
    nics = []
    for attachment in sorted((a for a in attachments if a.lifecycle_state == "ATTACHED"),
                             key=lambda a: a.nic_index or 0):
        vnic = _get(clients.network.get_vnic, attachment.vnic_id, "OCI VNIC")
        nics.append(NicInfo(mac=vnic.mac_address, network=vnic.subnet_id,
                            ip_address=vnic.private_ip))
    return nics


def vm_info(clients: Clients, instance: Any) -> VMInfo:
    cpus, memory = _cpus_and_memory(instance)
    launch = instance.launch_options
    platform = instance.platform_config
    secure_boot = bool(platform and platform.is_secure_boot_enabled)
    uefi = bool(launch and launch.firmware == "UEFI_64") or secure_boot
    arm = ".A1." in instance.shape or ".A2." in instance.shape
    return VMInfo(**_summary_fields(instance), cpus=cpus, memory_mb=memory,
                  firmware="efi" if uefi else "bios", secure_boot=secure_boot,
                  architecture="arm64" if arm else "x86_64",
                  disks=_disks(clients, instance), nics=_nics(clients, instance))
