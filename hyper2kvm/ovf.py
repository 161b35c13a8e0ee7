"""OVF descriptors (1.x and 2.x, as vSphere and VirtualBox write them): parsed into a
VMInfo, and written from one."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidRequest
from core.models import DiskInfo, NicInfo, VMInfo

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

# CIM resource types (DMTF DSP1041)
CPU, MEMORY, IDE, SCSI, ETHERNET, CDROM, DVD, DISK, SATA = 3, 4, 5, 6, 10, 15, 16, 17, 20
_CONTROLLERS = {IDE: "ide", SCSI: "scsi", SATA: "sata"}
_UNITS = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.IGNORECASE)
_NAMED_UNITS = {"kilobytes": 2**10, "megabytes": 2**20, "gigabytes": 2**30, "terabytes": 2**40,
                "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}


@dataclass(frozen=True)
class OvfFile:
    """A File of the descriptor's References section."""

    id: str
    href: str
    size: int | None


@dataclass(frozen=True)
class OvfDescriptor:
    vm: VMInfo
    files: dict[str, OvfFile]  # by file id


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(element: ET.Element, name: str) -> str | None:
    """An attribute by local name, whatever its namespace (OVF 1 and 2 differ)."""
    for key, value in element.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _find(element: ET.Element, name: str) -> ET.Element | None:
    return next((e for e in element.iter() if _local(e.tag) == name), None)


def _text(element: ET.Element, name: str) -> str | None:
    child = next(iter(_children(element, name)), None)
    return child.text.strip() if child is not None and child.text else None


def allocation_units(units: str | None, default: int = 1) -> int:
    """'byte * 2^20' → 1048576; also 'MegaBytes', 'MB'."""
    if not units:
        return default
    match = _UNITS.match(units)
    if match:
        base, power = match.groups()
        return int(base) ** int(power) if base else 1
    named = _NAMED_UNITS.get(units.strip().lower())
    if named is None:
        raise InvalidRequest(f"OVF: unknown allocation units {units!r}")
    return named


def parse_ovf(text: str | bytes) -> OvfDescriptor:
    """Parse an OVF envelope with one VirtualSystem."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InvalidRequest(f"OVF descriptor is not valid XML: {exc}") from None
    if _local(root.tag) != "Envelope":
        raise InvalidRequest(f"OVF descriptor root is <{_local(root.tag)}>, not <Envelope>")

    files: dict[str, OvfFile] = {}
    references = next(iter(_children(root, "References")), None)
    for file in _children(references, "File") if references is not None else []:
        size = _attr(file, "size")
        fid, href = _attr(file, "id"), _attr(file, "href")
        if fid and href:
            files[fid] = OvfFile(fid, href, int(size) if size else None)

    disks_by_id: dict[str, DiskInfo] = {}
    disk_section = _find(root, "DiskSection")
    for disk in _children(disk_section, "Disk") if disk_section is not None else []:
        disk_id = _attr(disk, "diskId") or f"disk{len(disks_by_id) + 1}"
        capacity = int(_attr(disk, "capacity") or 0)
        capacity *= allocation_units(_attr(disk, "capacityAllocationUnits"))
        file_ref = _attr(disk, "fileRef")
        fmt = _attr(disk, "format") or ""
        populated = _attr(disk, "populatedSize")
        disks_by_id[disk_id] = DiskInfo(
            name=disk_id,
            capacity_bytes=capacity,
            allocated_bytes=int(populated) if populated and populated.isdigit() else None,
            format="vmdk" if "vmdk" in fmt.lower() or not fmt else fmt.rsplit("/", 1)[-1],
            file=files[file_ref].href if file_ref in files else None,
        )

    system = _find(root, "VirtualSystem")
    if system is None:
        raise InvalidRequest("OVF descriptor has no VirtualSystem")
    name = _text(system, "Name") or _attr(system, "id") or "vm"
    os_section = next(iter(_children(system, "OperatingSystemSection")), None)
    guest_os = None
    if os_section is not None:
        guest_os = _attr(os_section, "osType") or _text(os_section, "Description")

    hardware = _find(system, "VirtualHardwareSection")
    cpus, memory_mb, cdroms = 1, 1024, 0
    firmware, secure_boot = "bios", False
    nics: list[NicInfo] = []
    controllers: dict[str, str] = {}
    disk_items: list[tuple[ET.Element, str | None]] = []
    for item in list(hardware) if hardware is not None else []:
        tag = _local(item.tag)
        if tag == "Config":
            key, value = _attr(item, "key"), (_attr(item, "value") or "").lower()
            if key == "firmware" and value in ("efi", "bios"):
                firmware = value
            elif key == "bootOptions.efiSecureBootEnabled":
                secure_boot = value == "true"
            continue
        if tag not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        kind = int(_text(item, "ResourceType") or 0)
        quantity = _text(item, "VirtualQuantity")
        if kind == CPU and quantity:
            cpus = int(quantity)
        elif kind == MEMORY and quantity:
            units = allocation_units(_text(item, "AllocationUnits"), default=2**20)
            memory_mb = max(1, int(quantity) * units // 2**20)
        elif kind in _CONTROLLERS:
            controllers[_text(item, "InstanceID") or ""] = _CONTROLLERS[kind]
        elif kind == ETHERNET:
            nics.append(
                NicInfo(
                    mac=_text(item, "Address"),
                    network=_text(item, "Connection"),
                    adapter=(_text(item, "ResourceSubType") or "e1000").lower(),
                )
            )
        elif kind in (CDROM, DVD):
            cdroms += 1
        elif kind == DISK:
            disk_items.append((item, _text(item, "Parent")))

    disks: list[DiskInfo] = []
    for item, parent in disk_items:
        host = _text(item, "HostResource") or ""
        disk_id = host.rsplit("/", 1)[-1]
        found = disks_by_id.pop(disk_id, None)
        if found is None:
            raise InvalidRequest(f"OVF: disk item refers to unknown disk {host!r}")
        controller = controllers.get(parent or "", found.controller)
        unit = _text(item, "AddressOnParent")
        disks.append(found.model_copy(update={"controller": controller,
                                              "unit": int(unit) if unit else None}))
    disks.extend(disks_by_id.values())  # disks no hardware item mentions, in file order

    vm = VMInfo(
        identifier=name,
        name=name,
        provider="local",
        cpus=cpus,
        memory_mb=memory_mb,
        firmware=firmware,  # type: ignore[arg-type]
        secure_boot=secure_boot,
        guest_os=guest_os,
        disks=disks,
        nics=nics,
        cdroms=cdroms,
    )
    return OvfDescriptor(vm=vm, files=files)


def vmdk_format_uri(create_type: str) -> str:
    """The OVF Disk format VMware writes for a VMDK of this createType."""
    kind = {"streamoptimized": "streamOptimized", "monolithicsparse": "sparse"}.get(
        create_type.lower(), create_type)
    return f"http://www.vmware.com/interfaces/specifications/vmdk.html#{kind}"


def render_ovf(
    vm: VMInfo, disk_files: list[tuple[str, int]], *, include_cdrom: bool = False,
    formats: list[str] | None = None,
) -> str:
    """An OVF 1.0 descriptor (vSphere's shape) for `vm`, its disks stored in `disk_files`
    as (file name, file size), in the order of `vm.disks`; the disks' `formats` are
    streamOptimized VMDKs unless given."""
    ET.register_namespace("", OVF_NS)
    ET.register_namespace("ovf", OVF_NS)
    ET.register_namespace("rasd", RASD_NS)
    ET.register_namespace("vssd", VSSD_NS)
    ET.register_namespace("vmw", VMW_NS)

    def o(tag: str) -> str:
        return f"{{{OVF_NS}}}{tag}"

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        element = ET.SubElement(parent, tag, {o(k): v for k, v in attrs.items()})
        if text is not None:
            element.text = text
        return element

    def rasd(parent: ET.Element, tag: str, values: dict[str, str]) -> ET.Element:
        item = ET.SubElement(parent, o(tag))
        for key in sorted(values):  # CIM classes want their properties in order
            ET.SubElement(item, f"{{{RASD_NS}}}{key}").text = values[key]
        return item

    envelope = ET.Element(o("Envelope"))
    references = sub(envelope, o("References"))
    disk_section = sub(envelope, o("DiskSection"))
    sub(disk_section, o("Info"), "Virtual disk information")
    pairs = zip(vm.disks, disk_files, strict=True)
    for index, (disk, (file_name, file_size)) in enumerate(pairs, 1):
        sub(references, o("File"), id=f"file{index}", href=file_name, size=str(file_size))
        sub(disk_section, o("Disk"), diskId=f"vmdisk{index}", fileRef=f"file{index}",
            capacity=str(disk.capacity_bytes), capacityAllocationUnits="byte",
            format=formats[index - 1] if formats else STREAM_OPTIMIZED)
    networks = sorted({nic.network or "VM Network" for nic in vm.nics})
    network_section = sub(envelope, o("NetworkSection"))
    sub(network_section, o("Info"), "The list of logical networks")
    for network in networks:
        sub(sub(network_section, o("Network"), name=network), o("Description"), network)

    system = sub(envelope, o("VirtualSystem"), id=vm.name)
    sub(system, o("Info"), "A virtual machine")
    sub(system, o("Name"), vm.name)
    os_section = sub(system, o("OperatingSystemSection"), id="0")
    if vm.guest_os:
        os_section.set(f"{{{VMW_NS}}}osType", vm.guest_os)
    sub(os_section, o("Info"), "The guest operating system")
    hardware = sub(system, o("VirtualHardwareSection"))
    sub(hardware, o("Info"), "Virtual hardware requirements")
    system_item = sub(hardware, o("System"))
    for key, value in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                       ("VirtualSystemIdentifier", vm.name), ("VirtualSystemType", "vmx-14")):
        ET.SubElement(system_item, f"{{{VSSD_NS}}}{key}").text = value
    instance = 1
    rasd(hardware, "Item", {"AllocationUnits": "hertz * 10^6", "ElementName": f"{vm.cpus} vCPU",
                            "InstanceID": str(instance), "ResourceType": str(CPU),
                            "VirtualQuantity": str(vm.cpus)})
    instance += 1
    rasd(hardware, "Item", {"AllocationUnits": "byte * 2^20", "ElementName": f"{vm.memory_mb} MB",
                            "InstanceID": str(instance), "ResourceType": str(MEMORY),
                            "VirtualQuantity": str(vm.memory_mb)})
    controller_ids: dict[str, str] = {}
    for kind_name in dict.fromkeys(d.controller for d in vm.disks):
        instance += 1
        kind = {v: k for k, v in _CONTROLLERS.items()}.get(kind_name, SCSI)
        values = {"ElementName": f"{kind_name} controller", "InstanceID": str(instance),
                  "ResourceType": str(kind), "Address": "0"}
        if kind == SCSI:
            values["ResourceSubType"] = "VirtualSCSI"
        rasd(hardware, "Item", values)
        controller_ids[kind_name] = str(instance)
    positions: dict[str, int] = {}
    for index, disk in enumerate(vm.disks, 1):
        instance += 1
        slot = positions.get(disk.controller, 0)
        positions[disk.controller] = slot + 1
        rasd(hardware, "Item", {"AddressOnParent": str(slot), "ElementName": f"Hard disk {index}",
                                "HostResource": f"ovf:/disk/vmdisk{index}",
                                "InstanceID": str(instance),
                                "Parent": controller_ids[disk.controller],
                                "ResourceType": str(DISK)})
    for index, nic in enumerate(vm.nics, 1):
        instance += 1
        values = {"AutomaticAllocation": "true", "Connection": nic.network or "VM Network",
                  "ElementName": f"Network adapter {index}", "InstanceID": str(instance),
                  "ResourceSubType": nic.adapter.upper() if nic.adapter == "e1000" else nic.adapter,
                  "ResourceType": str(ETHERNET)}
        if nic.mac:
            values["Address"] = nic.mac
        rasd(hardware, "Item", values)
    for _ in range(vm.cdroms if include_cdrom else 0):
        instance += 1
        rasd(hardware, "Item", {"ElementName": "CD/DVD drive", "InstanceID": str(instance),
                                "ResourceType": str(CDROM), "AutomaticAllocation": "false"})
    firmware = ET.SubElement(hardware, f"{{{VMW_NS}}}Config")
    firmware.set(o("required"), "false")
    firmware.set(f"{{{VMW_NS}}}key", "firmware")
    firmware.set(f"{{{VMW_NS}}}value", vm.firmware)
    if vm.secure_boot:
        boot = ET.SubElement(hardware, f"{{{VMW_NS}}}Config")
        boot.set(o("required"), "false")
        boot.set(f"{{{VMW_NS}}}key", "bootOptions.efiSecureBootEnabled")
        boot.set(f"{{{VMW_NS}}}value", "true")
    ET.indent(envelope)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(envelope, encoding="unicode")


def write_descriptor(folder: Path, vm: VMInfo, vmdks: list[Path], *,
                     include_cdrom: bool = False) -> list[Path]:
    """Write `<vm>.ovf` and `<vm>.mf` beside `vmdks` (one per disk of `vm`, in order);
    returns the package's files, descriptor first, ready for an OVA."""
    from hyper2kvm.manifest import digest_file, render_manifest

    disks = [d.model_copy(update={"file": f.name}) for d, f in zip(vm.disks, vmdks, strict=True)]
    ovf = folder / f"{vm.name}.ovf"
    ovf.write_text(render_ovf(vm.model_copy(update={"disks": disks}),
                              [(f.name, f.stat().st_size) for f in vmdks],
                              include_cdrom=include_cdrom))
    manifest = folder / f"{vm.name}.mf"
    manifest.write_text(render_manifest((f.name, digest_file(f)) for f in (ovf, *vmdks)))
    return [ovf, *vmdks, manifest]
