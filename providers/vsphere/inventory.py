"""The vSphere inventory read with the PropertyCollector: a whole listing in one
retrieval (paged by the server), one VM's hardware in another; tags from vAPI."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
from pyVmomi import vim, vmodl

from core.errors import NotFound
from core.models import DiskInfo, NicInfo, PowerState, VMInfo, VMSummary
from providers.vsphere.session import Session, split_host, tls_context

log = logging.getLogger(__name__)
PC = vmodl.query.PropertyCollector

LISTING_PROPERTIES = ["name", "runtime.powerState", "parent", "customValue", "config.template"]
INFO_PROPERTIES = [
    *LISTING_PROPERTIES, "config.hardware.numCPU", "config.hardware.memoryMB",
    "config.hardware.device", "config.firmware", "config.bootOptions", "config.guestId",
    "config.guestFullName", "config.uuid", "snapshot", "layoutEx.file",
]
_ADAPTERS = {vim.vm.device.VirtualVmxnet3: "vmxnet3", vim.vm.device.VirtualE1000e: "e1000e",
             vim.vm.device.VirtualE1000: "e1000", vim.vm.device.VirtualPCNet32: "pcnet",
             vim.vm.device.VirtualVmxnet2: "vmxnet2"}
_CONTROLLERS = {vim.vm.device.VirtualSCSIController: "scsi",
                vim.vm.device.VirtualAHCIController: "sata",
                vim.vm.device.VirtualSATAController: "sata",
                vim.vm.device.VirtualIDEController: "ide",
                vim.vm.device.VirtualNVMEController: "nvme"}


def retrieve(content: Any, kinds: dict[type, list[str]], root: Any | None = None,
             objects: list[Any] | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """(object, {property: value}) for every object of `kinds` under `root` (or for the
    given `objects`), in one RetrievePropertiesEx and its continuation pages."""
    view = None
    if objects is None:
        view = content.viewManager.CreateContainerView(root or content.rootFolder,
                                                       list(kinds), True)
        traversal = PC.TraversalSpec(name="view", path="view", skip=False,
                                     type=vim.view.ContainerView)
        object_specs = [PC.ObjectSpec(obj=view, skip=True, selectSet=[traversal])]
    else:
        object_specs = [PC.ObjectSpec(obj=obj, skip=False) for obj in objects]
    spec = PC.FilterSpec(objectSet=object_specs,
                         propSet=[PC.PropertySpec(type=kind, pathSet=props)
                                  for kind, props in kinds.items()])
    collector = content.propertyCollector
    found: list[tuple[Any, dict[str, Any]]] = []
    try:
        page = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions(maxObjects=1000))
        while page is not None:
            found.extend((o.obj, {p.name: p.val for p in o.propSet or []})
                         for o in page.objects)
            page = collector.ContinueRetrievePropertiesEx(page.token) if page.token else None
    finally:
        if view is not None:
            view.Destroy()
    return found


@dataclass
class Tree:
    """Names and parents of folders and datacenters: a VM's folder path and datacenter."""

    names: dict[str, str]
    parents: dict[str, Any]
    datacenters: set[str]

    @classmethod
    def read(cls, content: Any) -> Tree:
        rows = retrieve(content, {vim.Folder: ["name", "parent"],
                                  vim.Datacenter: ["name", "parent"]})
        return cls(names={o._moId: p["name"] for o, p in rows},
                   parents={o._moId: p.get("parent") for o, p in rows},
                   datacenters={o._moId for o, _ in rows if isinstance(o, vim.Datacenter)})

    def locate(self, parent: Any) -> tuple[str | None, str | None]:
        """(datacenter name, folder path like '/DC0/vm/web') of a VM whose parent is given."""
        parts: list[str] = []
        datacenter = None
        node = parent
        while node is not None and node._moId in self.names:
            if node._moId in self.datacenters and datacenter is None:
                datacenter = self.names[node._moId]
            parts.append(self.names[node._moId])
            node = self.parents.get(node._moId)
        # the container view leaves out the root folder, as inventory paths do
        folder = "/" + "/".join(reversed(parts)) if parts else None
        return datacenter, folder


def _custom_attributes(content: Any, values: Any) -> list[str]:
    if not values:
        return []
    fields = {f.key: f.name for f in content.customFieldsManager.field or []}
    return [f"{fields.get(v.key, v.key)}={v.value}" for v in values]


def _power(value: Any) -> PowerState:
    return PowerState(str(value)) if value else PowerState.POWERED_OFF


def list_vms(session: Session) -> list[VMSummary]:
    """Every VM (not templates) with power state, datacenter, folder and tags."""
    content = session.content
    rows = [(vm, props) for vm, props in retrieve(content, {vim.VirtualMachine:
                                                           LISTING_PROPERTIES})
            if not props.get("config.template")]
    tree = Tree.read(content)
    tags = vapi_tags(session, [vm._moId for vm, _ in rows])
    summaries = []
    for vm, props in rows:
        datacenter, folder = tree.locate(props.get("parent"))
        summaries.append(VMSummary(
            identifier=vm._moId, name=props.get("name", vm._moId), provider="vsphere",
            power_state=_power(props.get("runtime.powerState")), datacenter=datacenter,
            folder=folder,
            tags=tags.get(vm._moId, []) + _custom_attributes(content, props.get("customValue")),
        ))
    return summaries


def find_vm(session: Session, identifier: str) -> Any:
    """A VM by managed object id ('vm-42'), inventory path ('/DC0/vm/web') or name."""
    content = session.content
    if identifier.startswith("/"):
        found = content.searchIndex.FindByInventoryPath(identifier.lstrip("/"))
        if isinstance(found, vim.VirtualMachine):
            return found
        raise NotFound(f"vSphere: no VM at inventory path {identifier!r}")
    rows = retrieve(content, {vim.VirtualMachine: ["name"]})
    by_id = [vm for vm, _ in rows if vm._moId == identifier]
    if by_id:
        return by_id[0]
    by_name = [vm for vm, props in rows if props.get("name") == identifier]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        ids = ", ".join(vm._moId for vm in by_name)
        raise NotFound(f"vSphere: {len(by_name)} VMs are named {identifier!r} ({ids}); "
                       "use the VM id")
    raise NotFound(f"vSphere: no VM {identifier!r} (give its id like vm-42, its name, "
                   "or its inventory path)")


def _network_name(backing: Any, portgroups: dict[str, str]) -> str | None:
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
        return str(backing.deviceName)
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        key = str(backing.port.portgroupKey)
        return portgroups.get(key, key)
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
        return str(backing.opaqueNetworkId)
    return None


def hardware(devices: list[Any], portgroups: dict[str, str]) -> tuple[
        list[DiskInfo], list[NicInfo], int]:
    """Disks (in device order, with controller and position), NICs and CD-ROM count."""
    controllers: dict[Any, Any] = {
        d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    disks: list[DiskInfo] = []
    nics: list[NicInfo] = []
    for device in devices:
        if isinstance(device, vim.vm.device.VirtualDisk):
            controller = controllers.get(device.controllerKey)
            kind = next((name for cls, name in _CONTROLLERS.items()
                         if isinstance(controller, cls)), "scsi")
            backing = device.backing
            file = getattr(backing, "fileName", None)
            datastore = getattr(getattr(backing, "datastore", None), "_moId", None)
            if file and file.startswith("["):
                datastore = file[1:file.index("]")]
            capacity = device.capacityInBytes or device.capacityInKB * 1024
            disks.append(DiskInfo(name=device.deviceInfo.label if device.deviceInfo else
                                  f"disk{len(disks) + 1}",
                                  capacity_bytes=capacity, controller=kind,
                                  unit=device.unitNumber, file=file, datastore=datastore))
        elif isinstance(device, vim.vm.device.VirtualEthernetCard):
            adapter = next((name for cls, name in _ADAPTERS.items()
                            if isinstance(device, cls)), "e1000")
            nics.append(NicInfo(mac=device.macAddress or None, adapter=adapter,
                                network=_network_name(device.backing, portgroups)))
    cdroms = sum(isinstance(d, vim.vm.device.VirtualCdrom) for d in devices)
    return disks, nics, cdroms


def _snapshot_names(tree: Any) -> list[str]:
    names: list[str] = []
    for node in tree or []:
        names.append(node.name)
        names.extend(_snapshot_names(node.childSnapshotList))
    return names


def vm_info(session: Session, vm: Any) -> VMInfo:
    """One VM's full hardware, in one retrieval (plus folders and port groups)."""
    content = session.content
    rows = retrieve(content, {vim.VirtualMachine: INFO_PROPERTIES}, objects=[vm])
    if not rows:
        raise NotFound(f"vSphere: VM {vm._moId} disappeared")
    props = rows[0][1]
    devices = list(props.get("config.hardware.device") or [])
    portgroups: dict[str, str] = {}
    if any(isinstance(getattr(d, "backing", None),
                      vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo)
           for d in devices):
        portgroups = {p["key"]: p["name"] for _, p in retrieve(
            content, {vim.dvs.DistributedVirtualPortgroup: ["key", "name"]})}
    disks, nics, cdroms = hardware(devices, portgroups)
    datacenter, folder = Tree.read(content).locate(props.get("parent"))
    boot = props.get("config.bootOptions")
    snapshot = props.get("snapshot")
    return VMInfo(
        identifier=vm._moId, name=props.get("name", vm._moId), provider="vsphere",
        power_state=_power(props.get("runtime.powerState")), datacenter=datacenter,
        folder=folder,
        tags=vapi_tags(session, [vm._moId]).get(vm._moId, [])
        + _custom_attributes(content, props.get("customValue")),
        cpus=props.get("config.hardware.numCPU") or 1,
        memory_mb=props.get("config.hardware.memoryMB") or 1024,
        firmware="efi" if props.get("config.firmware") == "efi" else "bios",
        secure_boot=bool(boot and boot.efiSecureBootEnabled),
        guest_os=props.get("config.guestId"),
        disks=disks, nics=nics, cdroms=cdroms,
        snapshots=_snapshot_names(snapshot.rootSnapshotList if snapshot else None),
    )


def vapi_tags(session: Session, vm_ids: list[str]) -> dict[str, list[str]]:
    """vSphere tag names attached to each VM, from the vAPI REST endpoint (vCenter only:
    an ESXi host or a server without it yields no tags). 2 + one call per tag."""
    if not vm_ids:
        return {}
    config = session.config
    host, port = split_host(config.host)
    base = f"https://{host}:{port}/rest/com/vmware/cis"
    try:
        with httpx.Client(verify=tls_context(config), timeout=60) as client:
            login = client.post(f"{base}/session", auth=(config.username,
                                                         config.password.get_secret_value()))
            if login.status_code != 200:
                return {}
            client.headers["vmware-api-session-id"] = login.json()["value"]
            try:
                attached = client.post(
                    f"{base}/tagging/tag-association",
                    params={"~action": "list-attached-tags-on-objects"},
                    json={"object_ids": [{"type": "VirtualMachine", "id": i} for i in vm_ids]},
                ).raise_for_status().json()["value"]
                names: dict[str, str] = {}
                result: dict[str, list[str]] = {}
                for entry in attached:
                    for tag_id in entry.get("tag_ids") or []:
                        if tag_id not in names:
                            tag = client.get(f"{base}/tagging/tag/id:{tag_id}")
                            names[tag_id] = tag.raise_for_status().json()["value"]["name"]
                        result.setdefault(entry["object_id"]["id"], []).append(names[tag_id])
                return result
            finally:
                client.delete(f"{base}/session")
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log.warning("vSphere %s: tags not read (%s)", config.host, exc)
        return {}
