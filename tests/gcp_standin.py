"""A STAND-IN for Google's Compute Engine, Cloud Build, Resource Manager (v3) and Artifact
Registry REST APIs and Google's OAuth 2.0 token endpoint, for tests only: no emulator
exists for them. It serves exactly the operations hypersdk's GCP provider calls, in the
wire format of the REST references (and the google-cloud-* clients' models): instances
(aggregated list, list, get, stop, start), machine types, disks, images (insert with
`forceCreate`, list by label filter, delete), zonal and global operations, builds (create
as a long-running operation with `BuildOperationMetadata`, get, list by tag, cancel), the
project (get: its number) and its IAM policy (getIamPolicy), and the packages of the
image tools' builder repositories (get). A build whose step image does not exist (a
regional builder in a region Google does not publish it to) fails as Cloud Build fails a
step it cannot pull. It issues tokens only
for a JWT assertion signed with the test service account's key (checked with its public
key), checks the bearer token of every call, and answers anything it does not know with
Google's error shape.

The disks' bytes are real: an image keeps a copy of its disk's raw content; an export
build runs the image-export tool's job on it — `qemu-img convert` into the format the
build asked for — and uploads the result into gcp-storage-emulator (the real GCS data
path) under the build's `-destination_uri`, with google-cloud-storage."""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.api_core.client_options import ClientOptions
from google.auth import jwt
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

EXPORT_TOOL = "gcr.io/compute-image-tools/gce_vm_image_export:release"
BUILDER_PROJECT = "compute-image-import"


def regional_tool(region: str) -> str:
    return f"{region}-docker.pkg.dev/{BUILDER_PROJECT}/wrappers/gce_vm_image_export:release"
MACHINE_TYPES = {
    "e2-micro": (2, 1024), "e2-small": (2, 2048), "n2-standard-4": (4, 16384),
    "t2a-standard-1": (1, 4096),
}
# what google-auth signs a service account's token request for, wherever token_uri points
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
BUILD_METADATA = "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "errors": [
            {"message": self.message, "domain": "global", "reason": self.reason}],
            "status": {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                       404: "NOT_FOUND", 409: "ALREADY_EXISTS"}.get(self.status, "UNKNOWN")}}


@dataclass
class State:
    project: str
    client_email: str
    public_key: bytes
    storage_endpoint: str
    work: Path
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # by zone/name
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)  # by zone/name
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (disk name, status of the instances using it) at each image made from a disk
    captures: list[tuple[str, str]] = field(default_factory=list)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    # permissions the service account lacks on every resource (testIamPermissions leaves
    # them out, and the calls needing them are refused 403)
    denied: set[str] = field(default_factory=set)
    # the project's VPC networks (a project may have deleted "default", as many do)
    networks: set[str] = field(default_factory=lambda: {"default"})
    # regions where Artifact Registry holds the image tools' regional builders
    builder_regions: set[str] = field(default_factory=lambda: {"us-central1", "europe-west4"})
    number: str = field(default_factory=lambda: str(100000000000 + secrets.randbelow(10**11)))
    # the project's IAM policy: role -> members (gcloud's defaults for image export granted)
    bindings: dict[str, set[str]] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    build_seconds: float = 0.5  # how long an export build works before it writes
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"https://www.googleapis.com/compute/v1/projects/{self.project}"


class StandIn:
    def __init__(self, state: State, server: ThreadingHTTPServer, key_file: Path) -> None:
        self.state, self.server, self.key_file = state, server, key_file
        self.url = f"http://127.0.0.1:{server.server_address[1]}"

    def add_instance(self, zone: str, name: str, *, machine_type: str = "e2-small",
                     disks: list[tuple[int, Path | None]], running: bool = False,
                     uefi: bool = False, secure_boot: bool = False,
                     labels: dict[str, str] | None = None, nics: int = 1,
                     interface: str = "SCSI", architecture: str = "X86_64",
                     local_ssds: int = 0, csek: tuple[int, ...] = ()) -> str:
        """An instance with disks of (size in GiB, raw content), and `local_ssds` local SSDs
        (SCRATCH: no source disk, as the API lists them); the disks at the indexes in `csek`
        are encrypted with a customer-supplied key (the API shows only its SHA-256);
        returns its numeric id."""
        state = self.state
        attached = []
        for index, (size_gb, content) in enumerate(disks):
            disk_name = f"{name}-disk{index}"
            raw = state.work / f"{zone}-{disk_name}.raw"
            with raw.open("wb") as out:
                if content is not None:
                    out.write(content.read_bytes())
                out.truncate(size_gb << 30)
            features = [{"type": "UEFI_COMPATIBLE"}] if uefi and index == 0 else []
            link = f"{state.base}/zones/{zone}/disks/{disk_name}"
            with state.lock:
                state.disks[f"{zone}/{disk_name}"] = {
                    "kind": "compute#disk", "id": str(uuid.uuid4().int >> 65), "name": disk_name,
                    "sizeGb": str(size_gb), "zone": f"{state.base}/zones/{zone}",
                    "status": "READY", "selfLink": link, "guestOsFeatures": features,
                    **({"diskEncryptionKey": {"sha256": base64.b64encode(
                        secrets.token_bytes(32)).decode()}} if index in csek else {}),
                    "architecture": architecture, "_raw": str(raw)}
            attached.append({
                "kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": "READ_WRITE",
                "source": link, "deviceName": disk_name, "index": index, "boot": index == 0,
                "autoDelete": index == 0, "interface": interface, "diskSizeGb": str(size_gb),
                "guestOsFeatures": features,
                "licenses": ["https://www.googleapis.com/compute/v1/projects/debian-cloud/"
                             "global/licenses/debian-12-bookworm"] if index == 0 else []})
        for local in range(local_ssds):
            attached.append({
                "kind": "compute#attachedDisk", "type": "SCRATCH", "mode": "READ_WRITE",
                "deviceName": f"local-ssd-{local}", "index": len(attached), "boot": False,
                "autoDelete": True, "interface": "NVME", "diskSizeGb": "375"})
        instance_id = str(uuid.uuid4().int >> 65)
        body: dict[str, Any] = {
            "kind": "compute#instance", "id": instance_id, "name": name,
            "zone": f"{state.base}/zones/{zone}",
            "machineType": f"{state.base}/zones/{zone}/machineTypes/{machine_type}",
            "status": "RUNNING" if running else "TERMINATED", "labels": labels or {},
            "disks": attached,
            "networkInterfaces": [{
                "kind": "compute#networkInterface", "name": f"nic{i}",
                "network": f"{state.base}/global/networks/{'default' if i == 0 else f'net{i}'}",
                "networkIP": f"10.128.{i}.{2 + len(state.instances)}"} for i in range(nics)],
            "selfLink": f"{state.base}/zones/{zone}/instances/{name}"}
        if secure_boot:
            body["shieldedInstanceConfig"] = {"enableSecureBoot": True, "enableVtpm": True,
                                              "enableIntegrityMonitoring": True}
        with state.lock:
            state.instances[f"{zone}/{name}"] = body
        return instance_id

    def status(self, zone: str, name: str) -> str:
        return str(self.state.instances[f"{zone}/{name}"]["status"])

    def statuses_at_image(self, instance: str) -> list[str]:
        """The instance's status when an image was made of each of its disks."""
        with self.state.lock:
            return [status for disk, status in self.state.captures
                    if disk.startswith(f"{instance}-")]

    def images(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.images.values())

    def builds(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.builds.values())

    def stop(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.state.work, ignore_errors=True)


def _storage(state: State) -> Any:
    return storage.Client(project=state.project, credentials=AnonymousCredentials(),
                          client_options=ClientOptions(api_endpoint=state.storage_endpoint))


def _operation(state: State, *, kind: str, target: str, zone: str | None) -> dict[str, Any]:
    """A Compute operation: RUNNING when answered, DONE at the first poll."""
    name = f"operation-{uuid.uuid4().hex[:20]}"
    body = {"kind": "compute#operation", "id": str(uuid.uuid4().int >> 65), "name": name,
            "operationType": kind, "targetLink": target, "status": "RUNNING", "progress": 0,
            "selfLink": f"{state.base}/{f'zones/{zone}' if zone else 'global'}/operations/{name}"}
    if zone:
        body["zone"] = f"{state.base}/zones/{zone}"
    with state.lock:
        state.operations[name] = {**body, "status": "DONE", "progress": 100}
    return body


def _run_build(state: State, build_id: str, image: dict[str, Any], uri: str, fmt: str,
               failure: str | None = None) -> None:
    """The image-export tool's job: the image's bytes into the bucket as `fmt`; or, where
    its worker cannot start (`failure`), FAILURE with the reason."""
    def status(value: str) -> bool:
        with state.lock:
            build = state.builds[build_id]
            if build["status"] == "CANCELLED":
                return False
            build["status"] = value
            return True

    if not status("WORKING"):
        return
    if failure is not None:
        with state.lock:
            state.builds[build_id].update(status="FAILURE", statusDetail=failure)
        return
    deadline = time.monotonic() + state.build_seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if state.builds[build_id]["status"] == "CANCELLED":
            return
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    work = Path(tempfile.mkdtemp(dir=state.work))
    try:
        converted = work / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, image["_raw"],
                        str(converted)], check=True)
        if state.builds[build_id]["status"] == "CANCELLED":
            return
        _storage(state).bucket(bucket).blob(name).upload_from_filename(str(converted))
        status("SUCCESS")
    except Exception as exc:  # noqa: BLE001 - the build fails as Cloud Build would say
        with state.lock:
            state.builds[build_id].update(status="FAILURE", statusDetail=str(exc)[:200])
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body()
        with self.state.lock:
            self.state.requests.append(f"{self.command} {url.path}")
        try:
            if url.path == "/token" and self.command == "POST":
                self._send(200, self._token(body))
                return
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if not self._authorized(token):
                raise ApiError(401, "required", "Request is missing required authentication "
                                                "credential. Expected OAuth 2 access token.")
            payload = json.loads(body) if body else {}
            if url.path.startswith(f"/compute/v1/projects/{self.state.project}/"):
                rest = url.path.removeprefix(f"/compute/v1/projects/{self.state.project}/")
                self._send(200, self._compute(self.command, rest, query, payload))
            elif url.path.startswith(f"/v1/projects/{self.state.project}/builds"):
                rest = url.path.removeprefix(f"/v1/projects/{self.state.project}/builds")
                self._send(200, self._builds(self.command, rest, query, payload))
            elif url.path.startswith(f"/v3/projects/{self.state.project}"):
                rest = url.path.removeprefix(f"/v3/projects/{self.state.project}")
                self._send(200, self._project(self.command, rest))
            elif url.path.startswith(f"/v1/projects/{BUILDER_PROJECT}/locations/"):
                self._send(200, self._package(self.command, url.path))
            else:
                raise ApiError(404, "notFound", f"The requested URL {url.path} was not found "
                                                "on this server.")
        except ApiError as exc:
            self._send(exc.status, exc.body())

    do_GET = do_POST = do_DELETE = _dispatch  # noqa: N815

    # ---- OAuth 2.0 ---------------------------------------------------------------------

    def _authorized(self, token: str) -> bool:
        """A token this endpoint issued, or a self-signed JWT of the service account (what
        google-auth sends when a client asks for JWT access, as the Cloud clients do)."""
        if token in self.state.tokens:
            return True
        try:
            claims = jwt.decode(token, certs=self.state.public_key)
        except (ValueError, TypeError):
            return False
        return bool(claims.get("iss") == self.state.client_email)

    def _token(self, body: bytes) -> dict[str, Any]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            raise ApiError(400, "unsupported_grant_type", "Invalid grant_type")
        try:
            claims = jwt.decode(form.get("assertion", ""), certs=self.state.public_key,
                                audience=GOOGLE_TOKEN_AUDIENCE)
        except ValueError as exc:
            raise _OAuthError(f"Invalid JWT Signature. ({exc})") from None
        if claims.get("iss") != self.state.client_email:
            raise _OAuthError("Invalid JWT: unknown issuer")
        token = secrets.token_urlsafe(24)
        with self.state.lock:
            self.state.tokens.add(token)
        return {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    # ---- Compute Engine ----------------------------------------------------------------

    def _compute(self, method: str, path: str, query: dict[str, str],
                 payload: dict[str, Any]) -> Any:
        state = self.state
        if method == "GET" and path == "aggregated/instances":
            items: dict[str, Any] = {}
            for key, instance in sorted(state.instances.items()):
                items.setdefault(f"zones/{key.split('/')[0]}", {"instances": []})[
                    "instances"].append(instance)
            return {"kind": "compute#instanceAggregatedList", "id": f"projects/{state.project}"
                    "/aggregated/instances", "items": items}
        if match := re.fullmatch(r"zones/([^/]+)/instances", path):
            zone = match.group(1)
            return {"kind": "compute#instanceList", "items": [
                i for k, i in sorted(state.instances.items()) if k.startswith(f"{zone}/")]}
        if match := re.fullmatch(r"zones/([^/]+)/instances/([^/]+)(/stop|/start)?", path):
            zone, name, action = match.groups()
            instance = self._get(state.instances, f"{zone}/{name}", "instances")
            if method == "GET" and not action:
                return instance
            if method == "POST" and action:
                with state.lock:
                    instance["status"] = "RUNNING" if action == "/start" else "TERMINATED"
                return _operation(state, kind=action[1:], target=instance["selfLink"], zone=zone)
        if method == "GET" and (match := re.fullmatch(r"zones/([^/]+)/machineTypes/([^/]+)",
                                                      path)):
            zone, name = match.groups()
            if name not in MACHINE_TYPES:
                raise ApiError(404, "notFound", f"The resource 'projects/{state.project}/zones/"
                                                f"{zone}/machineTypes/{name}' was not found")
            cpus, memory = MACHINE_TYPES[name]
            return {"kind": "compute#machineType", "name": name, "guestCpus": cpus,
                    "memoryMb": memory, "zone": zone,
                    "architecture": "ARM64" if name.startswith("t2a") else "X86_64"}
        if method == "GET" and (match := re.fullmatch(r"zones/([^/]+)/disks/([^/]+)", path)):
            disk = self._get(state.disks, "/".join(match.groups()), "disks")
            return {k: v for k, v in disk.items() if not k.startswith("_")}
        if match := re.fullmatch(r"(zones/[^/]+|global)/operations/([^/]+)", path):
            return self._get(state.operations, match.group(2), "operations")
        if method == "POST" and (match := re.fullmatch(
                r"zones/([^/]+)/disks/([^/]+)/testIamPermissions", path)):
            self._get(state.disks, "/".join(match.groups()), "disks")
            asked = payload.get("permissions") or []
            return {"permissions": [p for p in asked if p not in state.denied]}
        if method == "GET" and (match := re.fullmatch(r"global/networks/([^/]+)", path)):
            name = match.group(1)
            if name not in state.networks:
                raise ApiError(404, "notFound", f"The resource 'projects/{state.project}/"
                                                f"global/networks/{name}' was not found")
            return {"kind": "compute#network", "name": name,
                    "selfLink": f"{state.base}/global/networks/{name}",
                    "autoCreateSubnetworks": True}
        if path == "global/images" and method == "POST":
            return self._insert_image(payload, query)
        if path == "global/images" and method == "GET":
            wanted = query.get("filter", "")
            label = re.fullmatch(r"labels\.([\w-]+)\s*=\s*\"?([\w-]+)\"?", wanted)
            if wanted and not label:
                raise ApiError(400, "invalid", f"Invalid value for field 'filter': '{wanted}'")
            found = [self._public(i) for i in state.images.values()
                     if not label or i.get("labels", {}).get(label.group(1)) == label.group(2)]
            return {"kind": "compute#imageList", "items": found}
        if match := re.fullmatch(r"global/images/([^/]+)", path):
            image = self._get(state.images, match.group(1), "images")
            if method == "GET":
                return self._public(image)
            if method == "DELETE":
                with state.lock:
                    del state.images[image["name"]]
                Path(image["_raw"]).unlink(missing_ok=True)
                return _operation(state, kind="delete", target=image["selfLink"], zone=None)
        raise ApiError(400, "invalid", f"hypersdk's GCP stand-in does not serve {method} {path}")

    def _insert_image(self, payload: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        state = self.state
        name, source = payload.get("name", ""), payload.get("sourceDisk", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'")
        key = "/".join(source.split("/zones/")[-1].split("/disks/"))
        disk = self._get(state.disks, key, "disks")
        if "diskEncryptionKey" in disk and not payload.get("sourceDiskEncryptionKey"):
            raise ApiError(400, "resourceIsEncryptedWithCustomerEncryptionKey",
                           f"The resource '{source}' is encrypted with a customer-supplied "
                           "encryption key, and no key was provided.")
        if "compute.disks.useReadOnly" in state.denied:
            raise ApiError(403, "forbidden", "Required 'compute.disks.useReadOnly' permission "
                                             f"for '{source}'")
        users = [i for i in state.instances.values()
                 if any(d.get("source") == disk["selfLink"] for d in i["disks"])]
        if (any(i["status"] == "RUNNING" for i in users)
                and query.get("forceCreate") != "true"):
            raise ApiError(400, "resourceInUseByAnotherResource",
                           f"The disk resource '{source}' is already being used by an instance")
        if name in state.images:
            raise ApiError(409, "alreadyExists", f"The resource 'projects/{state.project}/"
                                                 f"global/images/{name}' already exists")
        copy = state.work / f"image-{name}.raw"
        subprocess.run(["cp", "--sparse=always", disk["_raw"], str(copy)], check=True)
        link = f"{state.base}/global/images/{name}"
        with state.lock:
            state.captures += [(disk["name"], user["status"]) for user in users]
            state.images[name] = {
                "kind": "compute#image", "id": str(uuid.uuid4().int >> 65), "name": name,
                "sourceDisk": disk["selfLink"], "diskSizeGb": disk["sizeGb"],
                "labels": payload.get("labels", {}), "status": "READY", "selfLink": link,
                "description": payload.get("description", ""), "_raw": str(copy)}
        return _operation(state, kind="insert", target=link, zone=None)

    @staticmethod
    def _public(resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if not k.startswith("_")}

    def _get(self, table: dict[str, Any], key: str, kind: str) -> Any:
        with self.state.lock:
            found = table.get(key)
        if found is None:
            raise ApiError(404, "notFound", f"The resource 'projects/{self.state.project}/"
                                            f"{kind}/{key}' was not found")
        return found

    # ---- Resource Manager, Artifact Registry -------------------------------------------

    def _project(self, method: str, rest: str) -> Any:
        state = self.state
        if method == "GET" and rest == "":
            return {"name": f"projects/{state.number}", "projectId": state.project,
                    "state": "ACTIVE", "displayName": state.project, "parent": ""}
        if method == "POST" and rest == ":getIamPolicy":
            if "resourcemanager.projects.getIamPolicy" in state.denied:
                raise ApiError(403, "forbidden", "The caller does not have permission")
            with state.lock:
                bindings = [{"role": role, "members": sorted(members)}
                            for role, members in sorted(state.bindings.items()) if members]
            return {"version": 1, "etag": base64.b64encode(b"etag").decode(),
                    "bindings": bindings}
        raise ApiError(400, "invalid", f"hypersdk's GCP stand-in does not serve {method} "
                                       f"projects{rest}")

    def _package(self, method: str, path: str) -> Any:
        match = re.fullmatch(rf"/v1/projects/{BUILDER_PROJECT}/locations/([\w-]+)/"
                             r"repositories/wrappers/packages/([\w.-]+)", path)
        if method != "GET" or not match:
            raise ApiError(400, "invalid", f"hypersdk's GCP stand-in does not serve {method} "
                                           f"{path}")
        region, package = match.groups()
        if region not in self.state.builder_regions or package != "gce_vm_image_export":
            raise ApiError(404, "notFound", f"Requested entity was not found: {path[4:]}")
        return {"name": path[4:], "displayName": package,
                "createTime": "2024-01-01T00:00:00Z", "updateTime": "2026-01-01T00:00:00Z"}

    # ---- Cloud Build -------------------------------------------------------------------

    def _builds(self, method: str, rest: str, query: dict[str, str],
                payload: dict[str, Any]) -> Any:
        state = self.state
        if rest == "" and method == "POST":
            return self._create_build(payload)
        if rest == "" and method == "GET":
            wanted = query.get("filter", "")
            tag = re.fullmatch(r'tags\s*=\s*"([\w.-]+)"', wanted)
            if wanted and not tag:
                raise ApiError(400, "invalid", f"invalid list filter {wanted!r}")
            return {"builds": [self._public(b) for b in state.builds.values()
                               if not tag or tag.group(1) in b["tags"]]}
        if match := re.fullmatch(r"/([\w-]+)(:cancel)?", rest):
            build = self._get(state.builds, match.group(1), "builds")
            if method == "GET" and not match.group(2):
                return self._public(build)
            if method == "POST" and match.group(2):
                with state.lock:
                    if build["status"] in ("QUEUED", "WORKING", "PENDING"):
                        build["status"] = "CANCELLED"
                return self._public(build)
        raise ApiError(400, "invalid", f"hypersdk's GCP stand-in does not serve {method} "
                                       f"builds{rest}")

    def _create_build(self, payload: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        steps = payload.get("steps") or []
        tools = {EXPORT_TOOL} | {regional_tool(r) for r in (
            "us-central1", "us-east1", "europe-west4", "asia-east1", "nowhere1")}
        if len(steps) != 1 or steps[0].get("name") not in tools:
            raise ApiError(400, "invalid", "the stand-in runs one step: the image export tool")
        args = dict(a.lstrip("-").split("=", 1) for a in steps[0].get("args", []) if "=" in a)
        image_name = args.get("source_image", "").rsplit("/", 1)[-1]
        image = self._get(state.images, image_name, "images")
        uri, fmt = args.get("destination_uri", ""), args.get("format", "")
        if not uri.startswith("gs://") or fmt not in ("qcow2", "vmdk", "vpc", "raw"):
            raise ApiError(400, "invalid", f"bad -destination_uri {uri!r} or -format {fmt!r}")
        build_id = str(uuid.uuid4())
        # the tool starts its worker VM on -network (default: "default") once it runs
        network = args.get("network", "default").rsplit("/", 1)[-1]
        failure = (None if network in state.networks else
                   f"network {network!r} not found: the export worker could not start")
        step = steps[0]["name"]
        if step != EXPORT_TOOL and step.split("-docker.pkg.dev")[0] not in state.builder_regions:
            failure = f"failed to pull step image {step!r}: manifest unknown"
        build = {"id": build_id, "projectId": state.project, "status": "QUEUED",
                 "steps": steps, "tags": payload.get("tags", []),
                 "timeout": payload.get("timeout", "600s"),
                 "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "logUrl": f"https://console.cloud.google.com/cloud-build/builds/{build_id}"}
        with state.lock:
            state.builds[build_id] = build
        threading.Thread(target=_run_build, args=(state, build_id, image, uri, fmt, failure),
                         daemon=True, name=f"build-{build_id[:8]}").start()
        name = base64.urlsafe_b64encode(build_id.encode()).decode()
        return {"name": f"operations/build/{state.project}/{name}",
                "metadata": {"@type": BUILD_METADATA, "build": self._public(build)}}


class _OAuthError(ApiError):
    """The token endpoint's own error shape (google-auth raises RefreshError on it)."""

    def __init__(self, description: str) -> None:
        super().__init__(400, "invalid_grant", description)

    def body(self) -> dict[str, Any]:
        return {"error": "invalid_grant", "error_description": self.message}


def service_account_key() -> tuple[bytes, bytes]:
    """(private key PEM, public key PEM) of a new RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def start_standin(*, storage_endpoint: str, port: int) -> StandIn:
    """The stand-in on `port`, a project of its own, and the service account key file
    (JSON, as the console hands it out) whose token endpoint is the stand-in."""
    work = Path(tempfile.mkdtemp(prefix="gcp-standin-", dir="/var/tmp"))
    project = f"hypersdk-{secrets.token_hex(3)}"
    email = f"migrator@{project}.iam.gserviceaccount.com"
    private, public = service_account_key()
    state = State(project=project, client_email=email, public_key=public,
                  storage_endpoint=storage_endpoint, work=work)
    build_account = f"serviceAccount:{state.number}@cloudbuild.gserviceaccount.com"
    state.bindings = {  # what gcloud grants before its first image export
        "roles/compute.admin": {build_account},
        "roles/iam.serviceAccountTokenCreator": {build_account},
        "roles/iam.serviceAccountUser": {build_account},
        "roles/editor": {f"serviceAccount:{state.number}-compute@developer.gserviceaccount.com"},
    }
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="gcp-standin").start()
    key_file = work / "service-account.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": project, "private_key_id": secrets.token_hex(20),
        "private_key": private.decode(), "client_email": email, "client_id": "1" * 21,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": f"http://127.0.0.1:{port}/token"}))
    key_file.chmod(0o600)
    return StandIn(state, server, key_file)
