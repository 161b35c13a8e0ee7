"""A STAND-IN for Azure Resource Manager and its login endpoint, for tests only: no ARM
emulator exists. It serves exactly the operations hypersdk's Azure provider calls, in the
wire format of the ARM REST reference (and azure-mgmt-compute/-network's models): VMs with
instance views, VM sizes, managed disks, snapshots (PUT, GET, list, DELETE,
`beginGetAccess`/`endGetAccess` as long-running operations answering 202 + `Location`),
network interfaces, and deallocate/start. It speaks TLS (azure-core sends a bearer token
only over https), issues a token at `/{tenant}/oauth2/v2.0/token` for the one client id and
secret it knows, checks the bearer token and the `api-version` of every call, and answers
anything else with ARM's error shape.

The disks' bytes are real page blobs in Azurite (the Azure Storage emulator): a disk is a
fixed VHD uploaded with its holes left unwritten; a snapshot is an Azurite snapshot of that
blob; granted access is a read-only SAS URL to it. The provider reads them with
azure-storage-blob exactly as it would read Azure's."""

from __future__ import annotations

import json
import re
import secrets
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")
CONTAINER = "disks"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "hypersdk-test-client"
# the api-versions azure-mgmt-compute 39 and azure-mgmt-network 33 send for these calls
API_VERSIONS = {"compute": {"2026-04-01", "2026-03-02", "2026-03-03", "2021-07-01"},
                "network": {"2026-03-01"}, "authorization": {"2022-04-01"}}
SIZES = [
    {"name": "Standard_B1s", "numberOfCores": 1, "memoryInMB": 1024},
    {"name": "Standard_D2s_v3", "numberOfCores": 2, "memoryInMB": 8192},
    {"name": "Standard_D4s_v3", "numberOfCores": 4, "memoryInMB": 16384},
]
# sizes retired or closed to new deployments: Resource SKUs still describe them (with a
# restriction), the deprecated vmSizes list no longer does, though VMs still run on them
RETIRED_SIZES = [{"name": "Standard_A1", "numberOfCores": 1, "memoryInMB": 1792}]
PAGE = 4 << 20  # the most one Put Page may write


def _resource_skus(query: dict[str, str]) -> dict[str, Any]:
    """Resource SKUs of VM sizes, as GET .../providers/Microsoft.Compute/skus answers."""
    wanted = re.fullmatch(r"location eq '([^']+)'", query.get("$filter", ""))
    location = wanted.group(1) if wanted else "westeurope"
    return {"value": [{
        "resourceType": "virtualMachines", "name": size["name"], "tier": "Standard",
        "size": size["name"].split("_", 1)[1], "locations": [location],
        "capabilities": [{"name": "vCPUs", "value": str(size["numberOfCores"])},
                         {"name": "MemoryGB", "value": str(size["memoryInMB"] / 1024)}],
        "restrictions": [{"type": "Location", "values": [location],
                          "reasonCode": "NotAvailableForSubscription"}]
        if size in RETIRED_SIZES else []} for size in SIZES + RETIRED_SIZES]}


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class State:
    subscription: str
    blob_endpoint: str
    sas_endpoint: str  # where granted SAS URLs point (Azurite, or a proxy in front of it)
    secret: str
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)  # by lower-case id
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (disk name, power state of the VM it belongs to) at each snapshot, kept for good
    captures: list[tuple[str, str]] = field(default_factory=list)
    nics: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # how long the background copy of an incremental snapshot of a Premium SSD v2 or Ultra
    # disk lasts here (on Azure: minutes to hours); no access is granted before it ends
    copy_seconds: float = 6.0
    # actions the client's role assignments exclude (its role: "*" but these), as the
    # permissions API reports them and as ARM refuses them (403 AuthorizationFailed)
    denied_actions: set[str] = field(default_factory=set)

    def rid(self, group: str, kind: str, name: str) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{group}/providers/"
                f"{kind}/{name}")

    def blobs(self) -> BlobServiceClient:
        return BlobServiceClient(self.blob_endpoint, credential={
            "account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY})


def _vhd_blob(state: State, name: str, raw: Path | None, size: int, *,
              fragmented: bool = False) -> str:
    """Upload `raw` (padded to `size`) as a fixed VHD page blob, holes left unwritten:
    4 MiB pages, or with `fragmented` each run of 512-byte pages holding data on its own
    (a blob written by a guest over years has thousands of small page ranges)."""
    container = state.blobs().get_container_client(CONTAINER)
    if not container.exists():
        container.create_container()
    work = Path(f"/tmp/standin-{uuid.uuid4().hex}")
    work.mkdir()
    try:
        source = work / "disk.raw"
        with source.open("wb") as out:
            if raw is not None:
                out.write(raw.read_bytes())
            out.truncate(size)
        vhd = work / "disk.vhd"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vpc", "-o",
                        "subformat=fixed,force_size=on", str(source), str(vhd)], check=True)
        total = vhd.stat().st_size
        assert total == size + 512, (total, size)
        blob = container.get_blob_client(f"{name}.vhd")
        blob.create_page_blob(total)
        with vhd.open("rb") as data:
            for offset in range(0, total, PAGE):
                chunk = data.read(PAGE)
                if chunk.count(0) == len(chunk) and offset + len(chunk) != total:
                    continue
                for start, end in (_data_runs(chunk) if fragmented else [(0, len(chunk))]):
                    blob.upload_page(chunk[start:end], offset=offset + start,
                                     length=end - start)
        return f"{name}.vhd"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def _data_runs(chunk: bytes) -> list[tuple[int, int]]:
    """[start, end) of each run of 512-byte sectors of `chunk` that are not all zeros."""
    runs: list[tuple[int, int]] = []
    for start in range(0, len(chunk), 512):
        if chunk[start:start + 512].count(0) == 512:
            continue
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + 512)
        else:
            runs.append((start, start + 512))
    return runs


class StandIn:
    """The stand-in server and what tests put in it."""

    def __init__(self, state: State, server: ThreadingHTTPServer, ca: Path) -> None:
        self.state, self.server, self.ca = state, server, ca
        self.url = f"https://127.0.0.1:{server.server_address[1]}"

    def add_disk(self, group: str, name: str, *, size: int, content: Path | None,
                 generation: str = "V1", os_type: str | None = None,
                 sku: str = "Premium_LRS", fragmented: bool = False,
                 properties: dict[str, Any] | None = None) -> str:
        """A managed disk; `properties`: more of the disk's ARM properties (its
        encryptionSettingsCollection, networkAccessPolicy, ...), as ARM returns them."""
        blob = _vhd_blob(self.state, f"{group}-{name}", content, size, fragmented=fragmented)
        disk_id = self.state.rid(group, "Microsoft.Compute/disks", name)
        disk_properties: dict[str, Any] = {
            "diskSizeGB": size >> 30, "diskSizeBytes": size, "hyperVGeneration": generation,
            "creationData": {"createOption": "Empty"}, "provisioningState": "Succeeded",
            "diskState": "Attached", "supportedCapabilities": {"architecture": "x64"}}
        if os_type:
            disk_properties["osType"] = os_type
        disk_properties.update(properties or {})
        with self.state.lock:
            self.state.disks[disk_id.lower()] = {
                "id": disk_id, "name": name, "type": "Microsoft.Compute/disks",
                "location": "westeurope", "sku": {"name": sku, "tier": sku.split("_")[0]},
                "properties": disk_properties, "_blob": blob}
        return disk_id

    def add_vm(self, group: str, name: str, *, size: str = "Standard_D2s_v3",
               disks: list[tuple[int, Path | None]], generation: str = "V1",
               os_type: str = "Linux", running: bool = False, secure_boot: bool = False,
               macs: tuple[str, ...] = ("00-0D-3A-11-22-33",),
               tags: dict[str, str] | None = None, sku: str = "Premium_LRS",
               fragmented: bool = False, disk_properties: dict[str, Any] | None = None
               ) -> str:
        """A VM whose disks (size in bytes, raw content; SKU `sku`) are page blobs in
        Azurite."""
        disk_ids = [self.add_disk(group, f"{name}-disk{i}", size=s, content=c,
                                  generation=generation,
                                  os_type=os_type if i == 0 else None, sku=sku,
                                  fragmented=fragmented, properties=disk_properties)
                    for i, (s, c) in enumerate(disks)]
        nic_ids = []
        for index, mac in enumerate(macs):
            nic_name = f"{name}-nic{index}"
            nic_id = self.state.rid(group, "Microsoft.Network/networkInterfaces", nic_name)
            nic_ids.append(nic_id)
            subnet = self.state.rid(group, "Microsoft.Network/virtualNetworks",
                                    "vnet") + "/subnets/default"
            self.state.nics[nic_id.lower()] = {
                "id": nic_id, "name": nic_name, "location": "westeurope",
                "type": "Microsoft.Network/networkInterfaces",
                "properties": {"macAddress": mac, "primary": index == 0,
                               "provisioningState": "Succeeded",
                               "ipConfigurations": [{
                                   "id": f"{nic_id}/ipConfigurations/ipconfig1",
                                   "name": "ipconfig1",
                                   "properties": {"privateIPAddress": f"10.0.0.{4 + index}",
                                                  "subnet": {"id": subnet},
                                                  "primary": True}}]}}
        vm_id = self.state.rid(group, "Microsoft.Compute/virtualMachines", name)
        sizes = [self.state.disks[d.lower()]["properties"]["diskSizeGB"] for d in disk_ids]
        properties: dict[str, Any] = {
            "vmId": str(uuid.uuid4()), "hardwareProfile": {"vmSize": size},
            "storageProfile": {
                "osDisk": {"osType": os_type, "name": f"{name}-disk0",
                           "createOption": "FromImage", "diskSizeGB": sizes[0],
                           "managedDisk": {"id": disk_ids[0]}},
                "dataDisks": [{"lun": lun, "name": f"{name}-disk{lun + 1}",
                               "createOption": "Attach", "diskSizeGB": sizes[lun + 1],
                               "managedDisk": {"id": d}}
                              for lun, d in enumerate(disk_ids[1:])]},
            "networkProfile": {"networkInterfaces": [
                {"id": n, "properties": {"primary": i == 0}} for i, n in enumerate(nic_ids)]},
            "provisioningState": "Succeeded",
        }
        if secure_boot:
            properties["securityProfile"] = {"securityType": "TrustedLaunch", "uefiSettings": {
                "secureBootEnabled": True, "vTpmEnabled": True}}
        with self.state.lock:
            self.state.vms[vm_id.lower()] = {
                "id": vm_id, "name": name, "type": "Microsoft.Compute/virtualMachines",
                "location": "westeurope", "tags": tags or {}, "properties": properties,
                "_power": "running" if running else "deallocated"}
        return vm_id

    def power(self, vm_id: str) -> str:
        return str(self.state.vms[vm_id.lower()]["_power"])

    def powers_at_snapshot(self, vm_name: str) -> list[str]:
        """The VM's power state when each of its disks was snapshotted."""
        with self.state.lock:
            return [power for disk, power in self.state.captures
                    if disk.startswith(f"{vm_name}-")]

    def snapshots(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.snapshots.values())

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the handler --------------------------------------------------------------------------

_RG = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers"


class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}") if length else {}

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        try:
            if parts.path.startswith(f"/{TENANT}/"):
                return self._login(parts.path)
            self._authorize()
            self._api_version(parts.path, query.get("api-version"))
            status, body, headers = self._route(self.command, parts.path, query)
            self._send(status, body, headers)
        except ArmError as exc:
            self._send(exc.status, {"error": {"code": exc.code, "message": exc.message}})

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _dispatch  # noqa: N815

    # -- login --------------------------------------------------------------------------
    def _login(self, path: str) -> None:
        base = f"https://{self.headers['Host']}/{TENANT}"
        if path.endswith("/v2.0/.well-known/openid-configuration"):
            return self._send(200, {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0", "device_authorization_endpoint":
                f"{base}/oauth2/v2.0/devicecode"})
        if path.endswith("/oauth2/v2.0/token") and self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            if form.get("client_id") != CLIENT_ID or form.get("client_secret") != \
                    self.state.secret:
                return self._send(401, {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided."})
            token = secrets.token_urlsafe(32)
            self.state.tokens.add(token)
            return self._send(200, {"token_type": "Bearer", "expires_in": 3600,
                                    "ext_expires_in": 3600, "access_token": token})
        return self._send(404, {"error": "not_found"})

    def _authorize(self) -> None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.state.tokens:
            raise ArmError(401, "AuthenticationFailed",
                           "Authentication failed. The 'Authorization' header is missing or "
                           "its token is not valid.")

    def _api_version(self, path: str, version: str | None) -> None:
        family = ("network" if "/Microsoft.Network/" in path else
                  "authorization" if "/Microsoft.Authorization/" in path else "compute")
        if not version:
            raise ArmError(400, "MissingApiVersionParameter",
                           "The api-version query parameter (?api-version=) is required.")
        if version not in API_VERSIONS[family]:
            raise ArmError(400, "InvalidApiVersionParameter",
                           f"The api-version '{version}' is invalid. The supported versions "
                           f"are '{', '.join(sorted(API_VERSIONS[family]))}'.")

    # -- resources ----------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, str]) -> tuple[
            int, Any, dict[str, str] | None]:
        state = self.state
        sub = f"/subscriptions/{state.subscription}"
        if not path.startswith(sub + "/") and path != sub:
            raise ArmError(404, "SubscriptionNotFound",
                           f"The subscription '{path.split('/')[2]}' could not be found.")
        routes: list[tuple[str, str, Any]] = [
            ("GET", rf"{sub}/providers/Microsoft\.Compute/virtualMachines", self._list_vms),
            ("GET", rf"{_RG}/Microsoft\.Compute/virtualMachines", self._list_vms),
            ("GET", rf"{_RG}/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)", self._get_vm),
            ("POST", rf"{_RG}/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)/"
                     r"(?P<action>deallocate|start)", self._power),
            ("GET", rf"{sub}/providers/Microsoft\.Compute/locations/(?P<loc>[^/]+)/vmSizes",
             lambda **_: (200, {"value": SIZES}, None)),
            ("GET", rf"{sub}/providers/Microsoft\.Compute/skus",
             lambda query, **_: (200, _resource_skus(query), None)),
            ("GET", rf"{sub}/providers/Microsoft\.Compute/locations/[^/]+/operations/"
                    r"(?P<op>[^/]+)", self._operation),
            ("GET", rf"{_RG}/Microsoft\.Compute/disks/(?P<name>[^/]+)", self._get_disk),
            ("GET", rf"{sub}/providers/Microsoft\.Compute/snapshots", self._list_snapshots),
            ("GET", rf"{_RG}/Microsoft\.Compute/snapshots", self._list_snapshots),
            ("PUT", rf"{_RG}/Microsoft\.Compute/snapshots/(?P<name>[^/]+)", self._put_snapshot),
            ("GET", rf"{_RG}/Microsoft\.Compute/snapshots/(?P<name>[^/]+)", self._get_snapshot),
            ("DELETE", rf"{_RG}/Microsoft\.Compute/snapshots/(?P<name>[^/]+)",
             self._delete_snapshot),
            ("POST", rf"{_RG}/Microsoft\.Compute/snapshots/(?P<name>[^/]+)/"
                     r"(?P<action>beginGetAccess|endGetAccess)", self._access),
            ("GET", rf"{_RG}/Microsoft\.Network/networkInterfaces/(?P<name>[^/]+)", self._get_nic),
            ("GET", rf"{_RG}/Microsoft\.Authorization/permissions", self._permissions),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path, flags=re.IGNORECASE)
            if verb == method and match:
                return handler(query=query, **{k: v for k, v in match.groupdict().items()
                                               if k != "sub"})
        raise ArmError(404, "InvalidResourceType",
                       f"The resource type could not be found for {method} {path}.")

    @staticmethod
    def _public(resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if not k.startswith("_")}

    def _vm_json(self, vm: dict[str, Any], expand: bool) -> dict[str, Any]:
        body = self._public(vm)
        if expand:
            body = {**body, "properties": {**body["properties"], "instanceView": {"statuses": [
                {"code": "ProvisioningState/succeeded", "level": "Info"},
                {"code": f"PowerState/{vm['_power']}", "level": "Info"}]}}}
        return body

    def _list_vms(self, query: dict[str, str], rg: str | None = None) -> tuple[int, Any, None]:
        expand = query.get("$expand") == "instanceView"
        with self.state.lock:
            vms = [v for v in self.state.vms.values()
                   if rg is None or f"/resourcegroups/{rg.lower()}/" in v["id"].lower()]
            return 200, {"value": [self._vm_json(v, expand) for v in vms]}, None

    def _vm(self, rg: str, name: str) -> dict[str, Any]:
        vm = self.state.vms.get(self.state.rid(rg, "Microsoft.Compute/virtualMachines",
                                               name).lower())
        if vm is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/"
                           f"virtualMachines/{name}' under resource group '{rg}' was not "
                           "found.")
        return vm

    def _get_vm(self, query: dict[str, str], rg: str, name: str) -> tuple[int, Any, None]:
        return 200, self._vm_json(self._vm(rg, name), query.get("$expand") == "instanceView"), \
            None

    def _operation_started(self, result: Any, apply: Any = None) -> tuple[int, None,
                                                                          dict[str, str]]:
        """202 + Location: the first poll answers 202 again, the next the result."""
        op = uuid.uuid4().hex
        self.state.operations[op] = {"result": result, "apply": apply, "polled": 0}
        location = (f"https://{self.headers['Host']}/subscriptions/{self.state.subscription}"
                    f"/providers/Microsoft.Compute/locations/westeurope/operations/{op}"
                    f"?api-version=2026-04-01")
        return 202, None, {"Location": location, "Retry-After": "1"}

    def _operation(self, query: dict[str, str], op: str) -> tuple[int, Any, dict[str, str]]:
        operation = self.state.operations.get(op)
        if operation is None:
            raise ArmError(404, "OperationNotFound", f"operation {op} not found")
        operation["polled"] += 1
        if operation["polled"] < 2:
            return 202, None, {"Location": f"https://{self.headers['Host']}{self.path}",
                               "Retry-After": "1"}
        if operation["apply"] is not None:
            operation["apply"]()
            operation["apply"] = None
        return 200, operation["result"], {}

    def _power(self, query: dict[str, str], rg: str, name: str, action: str) -> tuple[
            int, None, dict[str, str]]:
        vm = self._vm(rg, name)

        def apply() -> None:
            vm["_power"] = "running" if action == "start" else "deallocated"

        return self._operation_started(None, apply)

    def _get_disk(self, query: dict[str, str], rg: str, name: str) -> tuple[int, Any, None]:
        disk = self.state.disks.get(self.state.rid(rg, "Microsoft.Compute/disks", name).lower())
        if disk is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/disks/"
                           f"{name}' under resource group '{rg}' was not found.")
        return 200, self._public(disk), None

    def _snapshot(self, rg: str, name: str) -> dict[str, Any]:
        snapshot = self.state.snapshots.get(
            self.state.rid(rg, "Microsoft.Compute/snapshots", name).lower())
        if snapshot is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/"
                           f"snapshots/{name}' under resource group '{rg}' was not found.")
        return snapshot

    def _list_snapshots(self, query: dict[str, str], rg: str | None = None) -> tuple[
            int, Any, None]:
        with self.state.lock:
            found = [self._public(s) for s in self.state.snapshots.values()
                     if rg is None or f"/resourcegroups/{rg.lower()}/" in s["id"].lower()]
        return 200, {"value": found}, None

    def _permissions(self, query: dict[str, str], rg: str) -> tuple[int, Any, None]:
        with self.state.lock:
            denied = sorted(self.state.denied_actions)
        return 200, {"value": [{"actions": ["*"], "notActions": denied, "dataActions": [],
                                "notDataActions": []}]}, None

    def _authorize_action(self, action: str, scope: str) -> None:
        if action.lower() in {a.lower() for a in self.state.denied_actions}:
            raise ArmError(403, "AuthorizationFailed", f"The client '{CLIENT_ID}' with object "
                           f"id '{CLIENT_ID}' does not have authorization to perform action "
                           f"'{action}' over scope '{scope}' or the scope is invalid. If "
                           "access was recently granted, please refresh your credentials.")

    def _put_snapshot(self, query: dict[str, str], rg: str, name: str) -> tuple[
            int, Any, None]:
        self._authorize_action("Microsoft.Compute/snapshots/write",
                               self.state.rid(rg, "Microsoft.Compute/snapshots", name))
        body = self._body()
        creation = body.get("properties", {}).get("creationData", {})
        if creation.get("createOption") != "Copy":
            raise ArmError(400, "InvalidParameter", "Only createOption Copy is supported here.")
        disk = self.state.disks.get(str(creation.get("sourceResourceId", "")).lower())
        if disk is None:
            raise ArmError(404, "ResourceNotFound", "The source disk was not found.")
        blob = self.state.blobs().get_blob_client(CONTAINER, disk["_blob"])
        snapshot_blob = blob.create_snapshot()["snapshot"]
        snapshot_id = self.state.rid(rg, "Microsoft.Compute/snapshots", name)
        snapshot = {
            "id": snapshot_id, "name": name, "type": "Microsoft.Compute/snapshots",
            "location": body.get("location", "westeurope"), "tags": body.get("tags") or {},
            "sku": {"name": "Standard_LRS"},
            "properties": {"creationData": creation, "incremental": True,
                           "diskSizeBytes": disk["properties"]["diskSizeBytes"],
                           "diskSizeGB": disk["properties"]["diskSizeGB"],
                           "hyperVGeneration": disk["properties"]["hyperVGeneration"],
                           "provisioningState": "Succeeded", "diskState": "Unattached",
                           "timeCreated": datetime.now(UTC).isoformat()},
            "_blob": disk["_blob"], "_snapshot": snapshot_blob, "_access": False}
        if disk["sku"]["name"] in ("PremiumV2_LRS", "UltraSSD_LRS"):  # not instant-access
            snapshot["_copy_started"] = time.monotonic()
            snapshot["_copied_at"] = snapshot["_copy_started"] + self.state.copy_seconds
            self._copying(snapshot)
        owners = [vm["_power"] for vm in self.state.vms.values() if disk["id"].lower() in {
            d["managedDisk"]["id"].lower() for d in (
                vm["properties"]["storageProfile"]["osDisk"],
                *vm["properties"]["storageProfile"]["dataDisks"])}]
        with self.state.lock:
            self.state.snapshots[snapshot_id.lower()] = snapshot
            self.state.captures += [(disk["name"], power) for power in owners]
        return 200, self._public(snapshot), None

    def _get_snapshot(self, query: dict[str, str], rg: str, name: str) -> tuple[
            int, Any, None]:
        snapshot = self._snapshot(rg, name)
        self._copying(snapshot)
        return 200, self._public(snapshot), None

    @staticmethod
    def _copying(snapshot: dict[str, Any]) -> bool:
        """Where the snapshot's background copy is still running, its completionPercent
        and snapshotAccessState (Pending) say so; once done, 100 and Available."""
        left = snapshot.get("_copied_at", 0.0) - time.monotonic()
        copying = left > 0
        started = snapshot.get("_copy_started")
        properties = snapshot["properties"]
        if started is not None:
            whole = snapshot["_copied_at"] - started
            properties["completionPercent"] = (
                100.0 if not copying else round(100.0 * (1 - left / whole), 1))
            properties["snapshotAccessState"] = "Pending" if copying else "Available"
        return copying

    def _delete_snapshot(self, query: dict[str, str], rg: str, name: str) -> tuple[
            int, None, None]:
        snapshot = self._snapshot(rg, name)
        if snapshot["_access"]:
            raise ArmError(409, "OperationNotAllowed", f"Snapshot {name} has an active SAS "
                           "URI; revoke access first.")
        blob = self.state.blobs().get_blob_client(CONTAINER, snapshot["_blob"],
                                                  snapshot=snapshot["_snapshot"])
        blob.delete_blob()
        with self.state.lock:
            self.state.snapshots.pop(snapshot["id"].lower(), None)
        return 200, None, None

    def _access(self, query: dict[str, str], rg: str, name: str, action: str) -> tuple[
            int, None, dict[str, str]]:
        snapshot = self._snapshot(rg, name)
        if action == "endGetAccess":
            def revoke() -> None:
                snapshot["_access"] = False
                snapshot["properties"]["diskState"] = "Unattached"
            return self._operation_started(None, revoke)
        if self._body().get("access") != "Read":
            raise ArmError(400, "InvalidParameter", "access must be Read.")
        if self._copying(snapshot):
            raise ArmError(409, "OperationNotAllowed", f"Snapshot {name} cannot be accessed "
                           "while its background copy is in progress (completionPercent "
                           f"{snapshot['properties']['completionPercent']}).")
        # incremental snapshots: at most 5 of one disk may hold a SAS at a time
        family = str(snapshot["properties"]["creationData"]["sourceResourceId"]).lower()
        with self.state.lock:
            holding = [s["name"] for s in self.state.snapshots.values()
                       if s["_access"] and s is not snapshot and str(
                           s["properties"]["creationData"]["sourceResourceId"]).lower()
                       == family]
        if len(holding) >= 5:
            raise ArmError(409, "OperationNotAllowed", "The maximum number of snapshots with "
                           "an active SAS for the disk has been reached (5).")
        sas = generate_blob_sas(AZURITE_ACCOUNT, CONTAINER, snapshot["_blob"],
                                snapshot=snapshot["_snapshot"], account_key=AZURITE_KEY,
                                permission=BlobSasPermissions(read=True),
                                expiry=datetime.now(UTC) + timedelta(hours=2))
        url = (f"{self.state.sas_endpoint}/{CONTAINER}/{snapshot['_blob']}"
               f"?snapshot={snapshot['_snapshot']}&{sas}")

        def grant() -> None:
            snapshot["_access"] = True
            snapshot["properties"]["diskState"] = "ActiveSAS"
        return self._operation_started({"accessSAS": url}, grant)

    def _get_nic(self, query: dict[str, str], rg: str, name: str) -> tuple[int, Any, None]:
        nic = self.state.nics.get(
            self.state.rid(rg, "Microsoft.Network/networkInterfaces", name).lower())
        if nic is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Network/"
                           f"networkInterfaces/{name}' under resource group '{rg}' was not "
                           "found.")
        return 200, nic, None


def start_standin(*, blob_endpoint: str, cert: Path, key: Path, port: int,
                  sas_endpoint: str | None = None) -> StandIn:
    state = State(subscription=str(uuid.uuid4()), blob_endpoint=blob_endpoint,
                  sas_endpoint=sas_endpoint or blob_endpoint, secret=secrets.token_urlsafe(16))
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="arm-standin").start()
    return StandIn(state, server, cert)
