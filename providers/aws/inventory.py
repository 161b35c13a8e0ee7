"""EC2 instances as the shared models: listing through `describe_instances` (paged, the
seed's filters turned into EC2 filters), one instance's hardware from its type, image,
volumes and network interfaces."""

from __future__ import annotations

import re
from typing import Any

from core.errors import NotFound
from core.models import DiskInfo, NicInfo, PowerState, VMFilter, VMInfo, VMSummary
from providers.aws.session import Clients, call, map_error

_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
# EC2 states as the seed's power states; a terminated instance is gone
_POWER = {"pending": PowerState.POWERED_ON, "running": PowerState.POWERED_ON,
          "stopping": PowerState.POWERED_ON, "shutting-down": PowerState.POWERED_ON,
          "stopped": PowerState.POWERED_OFF}
_STATES = {PowerState.POWERED_ON: ["pending", "running", "stopping"],
           PowerState.POWERED_OFF: ["stopped"], PowerState.SUSPENDED: ["stopped"]}
LIVE_STATES = ["pending", "running", "stopping", "stopped"]


def tag_map(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in resource.get("Tags") or []}


def ec2_filters(vm_filter: VMFilter) -> list[dict[str, Any]]:
    """The seed's filter as EC2 filters (the rest is checked on our side as well, with the
    exact semantics of `VMFilter.matches`)."""
    states = _STATES.get(vm_filter.status, LIVE_STATES) if vm_filter.status else LIVE_STATES
    filters: list[dict[str, Any]] = [{"Name": "instance-state-name", "Values": states}]
    for tag in vm_filter.tags:
        key, sep, value = tag.partition("=")
        filters.append({"Name": f"tag:{key}", "Values": [value]} if sep
                       else {"Name": "tag-key", "Values": [key]})
    if vm_filter.name_pattern:  # EC2 filters take the same * and ? wildcards
        filters.append({"Name": "tag:Name", "Values": [vm_filter.name_pattern]})
    if vm_filter.datacenter:
        filters.append({"Name": "availability-zone", "Values": [vm_filter.datacenter]})
    return filters


def _summary_fields(instance: dict[str, Any]) -> dict[str, Any]:
    tags = tag_map(instance)
    return {
        "identifier": instance["InstanceId"],
        "name": tags.get("Name") or instance["InstanceId"],
        "provider": "aws",
        "power_state": _POWER.get(instance["State"]["Name"], PowerState.POWERED_OFF),
        "datacenter": instance.get("Placement", {}).get("AvailabilityZone"),
        "folder": instance.get("VpcId"),
        "tags": [f"{k}={v}" if v else k for k, v in sorted(tags.items())],
    }


def list_vms(clients: Clients, vm_filter: VMFilter) -> list[VMSummary]:
    pages = clients.ec2.get_paginator("describe_instances").paginate(
        Filters=ec2_filters(vm_filter), PaginationConfig={"PageSize": 500})
    found: list[VMSummary] = []
    try:
        for page in pages:
            for reservation in page.get("Reservations", []):
                found.extend(VMSummary(**_summary_fields(i)) for i in reservation["Instances"])
    except Exception as exc:  # noqa: BLE001 - mapped
        raise map_error(exc, "AWS describe_instances") from None
    return [vm for vm in found if vm_filter.matches(vm)]


def find_instance(clients: Clients, identifier: str) -> dict[str, Any]:
    """An instance by id (i-...) or by its Name tag (which must then be unique)."""
    if _INSTANCE_ID.match(identifier):
        answer = call(clients.ec2.describe_instances, f"AWS instance {identifier}",
                      InstanceIds=[identifier])
        filters = None
    else:
        filters = [{"Name": "tag:Name", "Values": [identifier]},
                   {"Name": "instance-state-name", "Values": LIVE_STATES}]
        answer = call(clients.ec2.describe_instances, f"AWS instance {identifier!r}",
                      Filters=filters)
    instances = [i for r in answer.get("Reservations", []) for i in r["Instances"]
                 if i["State"]["Name"] != "terminated"]
    if not instances:
        raise NotFound(f"AWS {clients.region}: no instance {identifier!r} (give its id like "
                       "i-0123456789abcdef0 or its Name tag)")
    if len(instances) > 1:
        ids = ", ".join(i["InstanceId"] for i in instances)
        raise NotFound(f"AWS {clients.region}: {len(instances)} instances are named "
                       f"{identifier!r} ({ids}); use the instance id")
    return instances[0]


def _device_order(name: str) -> tuple[str, int, str]:
    """'/dev/xvda' < '/dev/xvdb' < '/dev/xvdaa'; '/dev/sda1' as the first."""
    base = name.rsplit("/", 1)[-1].rstrip("0123456789")
    letters = re.sub(r"^(sd|xvd|hd|nvme\d*n?)", "", base)
    return (base[: len(base) - len(letters)], len(letters), letters)


def _firmware(clients: Clients, instance: dict[str, Any], type_info: dict[str, Any]) -> str:
    """The instance's BootMode when EC2 reports it, else its image's, else what its
    type supports (uefi-preferred boots UEFI where the type can)."""
    supported = type_info.get("SupportedBootModes") or ["legacy-bios"]
    mode = instance.get("BootMode") or instance.get("CurrentInstanceBootMode")
    if not mode and instance.get("ImageId"):
        try:
            images = clients.ec2.describe_images(ImageIds=[instance["ImageId"]])["Images"]
            mode = images[0].get("BootMode") if images else None
        except Exception:  # noqa: BLE001 - a deregistered image: fall back to the type
            mode = None
    if mode == "uefi-preferred":
        mode = "uefi" if "uefi" in supported else "legacy-bios"
    if not mode:
        mode = "legacy-bios" if "legacy-bios" in supported else "uefi"
    return "efi" if mode == "uefi" else "bios"


def vm_info(clients: Clients, instance: dict[str, Any]) -> VMInfo:
    """One instance's hardware: vCPUs and memory of its type, firmware, architecture,
    platform, its EBS volumes in device order and its network interfaces."""
    instance_id = instance["InstanceId"]
    kind = instance["InstanceType"]
    types = call(clients.ec2.describe_instance_types, f"AWS instance type {kind}",
                 InstanceTypes=[kind])["InstanceTypes"]
    type_info = types[0] if types else {}
    mappings = [m for m in instance.get("BlockDeviceMappings") or [] if "Ebs" in m]
    volumes: dict[str, dict[str, Any]] = {}
    if mappings:
        answer = call(clients.ec2.describe_volumes, f"AWS volumes of {instance_id}",
                      VolumeIds=[m["Ebs"]["VolumeId"] for m in mappings])
        volumes = {v["VolumeId"]: v for v in answer["Volumes"]}
    root = instance.get("RootDeviceName")
    ordered = sorted(mappings, key=lambda m: (m["DeviceName"] != root,
                                              _device_order(m["DeviceName"])))
    disks: list[DiskInfo] = []
    for mapping in ordered:
        volume_id = mapping["Ebs"]["VolumeId"]
        volume = volumes.get(volume_id, {})
        disks.append(DiskInfo(
            name=mapping["DeviceName"], capacity_bytes=int(volume.get("Size", 0)) << 30,
            format="raw", controller="scsi", unit=len(disks), datastore=volume_id))
    interfaces = sorted(instance.get("NetworkInterfaces") or [],
                        key=lambda n: n.get("Attachment", {}).get("DeviceIndex", 0))
    nics = [NicInfo(mac=n.get("MacAddress"), network=n.get("SubnetId"), adapter="ena",
                    ip_address=n.get("PrivateIpAddress")) for n in interfaces]
    memory = type_info.get("MemoryInfo", {}).get("SizeInMiB") or 1024
    cpus = (instance.get("CpuOptions", {}).get("CoreCount", 0)
            * instance.get("CpuOptions", {}).get("ThreadsPerCore", 1)
            or type_info.get("VCpuInfo", {}).get("DefaultVCpus") or 1)
    platform = (instance.get("Platform") or instance.get("PlatformDetails") or "").lower()
    return VMInfo(
        **_summary_fields(instance),
        cpus=cpus, memory_mb=memory, firmware=_firmware(clients, instance, type_info),  # type: ignore[arg-type]
        guest_os="windows" if platform.startswith("windows") else "linux",
        architecture=instance.get("Architecture"),
        disks=disks, nics=nics)
