"""A STAND-IN for Oracle Cloud Infrastructure's Compute, Block Storage, Networking, Work
Requests and Object Storage APIs, for tests only: no OCI emulator exists. It serves
exactly the operations hypersdk's OCI provider calls, in the wire format of the API
reference (and the oci SDK's models): instances (list, get, SOFTSTOP/START actions), boot
volume, volume and VNIC attachments, boot volumes, volumes, VNICs, images (create, get,
list, delete, export to Object Storage answered with `opc-work-request-id`), work
requests, and objects (namespace, HEAD, GET with `Range` → 206, list by prefix, DELETE).

Every request must carry an OCI HTTP signature (draft-cavage, `rsa-sha256`) made with the
test user's key: the stand-in rebuilds the signing string from the headers the request
says it signed, checks it with the user's public key, checks `x-content-sha256` against
the body, and answers 401 `NotAuthenticated` otherwise. Anything it does not know gets
OCI's error shape. An image export converts the instance's real boot volume bytes (a disk
made at test time) to QCOW2 with qemu-img and stores them as the object; object reads can
be told to fail (503) a number of times at an offset."""

from __future__ import annotations

import base64
import hashlib
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
from urllib.parse import parse_qs, unquote, urlsplit

import google_crc32c
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

API = "/20160918"
NOW = "2026-12-01T00:00:00.000Z"


class OciError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _ocid(kind: str) -> str:
    return f"ocid1.{kind}.oc1.iad.{secrets.token_hex(16)}"


@dataclass
class State:
    tenancy: str
    user: str
    fingerprint: str
    public_key: Any
    namespace: str
    work: Path
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    boot_volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    attachments: list[dict[str, Any]] = field(default_factory=list)  # boot, volume, vnic
    vnics: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    work_requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[tuple[str, str], Path] = field(default_factory=dict)  # (bucket, name)
    fail: dict[int, int] = field(default_factory=dict)  # object read offset -> failures left
    corrupt: set[int] = field(default_factory=set)  # object read offsets served a byte flipped
    # objects larger than this were written as multipart uploads (as an image export's
    # are): no Content-MD5, an opc-multipart-md5 (of the parts' MD5s) that cannot be
    # checked against the bytes; every object has its opc-content-crc32c
    multipart_above: int = 1 << 40
    export_seconds: float = 0.3
    unsigned: int = 0  # requests refused for their signature
    captured: list[tuple[str, str]] = field(default_factory=list)  # (instance, its state)
    # instances whose OS ignores SOFTSTOP's ACPI shutdown: they stay STOPPING (OCI powers
    # them off itself only after 15 minutes) until a STOP
    deaf: set[str] = field(default_factory=set)
    actions: list[tuple[str, str]] = field(default_factory=list)  # (instance, action)
    lock: threading.Lock = field(default_factory=threading.Lock)


class StandIn:
    def __init__(self, state: State, server: ThreadingHTTPServer, key_file: Path) -> None:
        self.state, self.server, self.key_file = state, server, key_file
        self.url = f"http://127.0.0.1:{server.server_address[1]}"

    def add_instance(self, name: str, *, boot: tuple[int, Path | None],
                     volumes: tuple[int, ...] = (), ocpus: float = 1, memory_gb: float = 1,
                     shape: str = "VM.Standard.E4.Flex", firmware: str = "BIOS",
                     secure_boot: bool = False, running: bool = False,
                     tags: dict[str, str] | None = None,
                     macs: tuple[str, ...] = ("02:00:17:00:00:01",)) -> str:
        """An instance with a boot volume of (GiB, raw content), block volumes (GiB), VNICs;
        returns its OCID."""
        state = self.state
        ad, compartment = "Uocm:US-ASHBURN-AD-1", state.tenancy
        instance_id = _ocid("instance")
        raw = state.work / f"{instance_id}.raw"
        with raw.open("wb") as out:
            if boot[1] is not None:
                out.write(boot[1].read_bytes())
            out.truncate(boot[0] << 30)
        common = {"availabilityDomain": ad, "compartmentId": compartment, "timeCreated": NOW}
        boot_id = _ocid("bootvolume")
        with state.lock:
            state.boot_volumes[boot_id] = {**common, "id": boot_id, "sizeInGBs": boot[0],
                                           "displayName": f"{name} (Boot Volume)",
                                           "lifecycleState": "AVAILABLE", "_raw": str(raw)}
            state.attachments.append({**common, "kind": "boot", "id": _ocid("bootvolumeattachment"),
                                      "instanceId": instance_id, "bootVolumeId": boot_id,
                                      "lifecycleState": "ATTACHED"})
            for index, size in enumerate(volumes):
                volume_id = _ocid("volume")
                state.volumes[volume_id] = {**common, "id": volume_id, "sizeInGBs": size,
                                            "displayName": f"{name}-data{index + 1}",
                                            "lifecycleState": "AVAILABLE"}
                state.attachments.append({**common, "kind": "volume",
                                          "attachmentType": "paravirtualized",
                                          "id": _ocid("volumeattachment"),
                                          "instanceId": instance_id, "volumeId": volume_id,
                                          "lifecycleState": "ATTACHED"})
            for index, mac in enumerate(macs):
                vnic_id = _ocid("vnic")
                subnet = _ocid("subnet")
                state.vnics[vnic_id] = {"id": vnic_id, "macAddress": mac, "subnetId": subnet,
                                        "privateIp": f"10.0.0.{10 + index}",
                                        "isPrimary": index == 0, "lifecycleState": "AVAILABLE",
                                        **common}
                state.attachments.append({**common, "kind": "vnic", "id": _ocid("vnicattachment"),
                                          "instanceId": instance_id, "vnicId": vnic_id,
                                          "subnetId": subnet, "nicIndex": index,
                                          "lifecycleState": "ATTACHED"})
            state.instances[instance_id] = {
                **common, "id": instance_id, "displayName": name, "region": "iad",
                "lifecycleState": "RUNNING" if running else "STOPPED", "shape": shape,
                "shapeConfig": {"ocpus": ocpus, "memoryInGBs": memory_gb,
                                "vcpus": int(ocpus * (1 if ".A1." in shape else 2))},
                "launchOptions": {"firmware": firmware, "bootVolumeType": "PARAVIRTUALIZED"},
                "platformConfig": {"type": "AMD_VM", "isSecureBootEnabled": secure_boot},
                "freeformTags": tags or {}, "_raw": str(raw)}
        return instance_id

    def state_of(self, instance_id: str) -> str:
        return str(self.state.instances[instance_id]["lifecycleState"])

    def images(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.images.values())

    def objects(self) -> list[str]:
        with self.state.lock:
            return [name for _, name in self.state.objects]

    def stop(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.state.work, ignore_errors=True)


def _public(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if not k.startswith("_") and k != "kind"}


def _run_export(state: State, request_id: str, image: dict[str, Any], bucket: str,
                name: str) -> None:
    work = state.work_requests[request_id]
    work["status"] = "IN_PROGRESS"
    steps = 5
    for step in range(steps):
        time.sleep(state.export_seconds / steps)
        if work["status"] == "CANCELING":
            work["status"] = "CANCELED"
            return
        work["percentComplete"] = 80.0 * (step + 1) / steps
    target = state.work / f"object-{uuid.uuid4().hex}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", image["_raw"],
                    str(target)], check=True)
    with state.lock:
        state.objects[(bucket, name)] = target
        image["lifecycleState"] = "AVAILABLE"
        work.update(status="SUCCEEDED", percentComplete=100.0, timeFinished=NOW)


class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None
                         else "application/json")
        self.send_header("opc-request-id", uuid.uuid4().hex)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self._check_signature(body)
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            payload = json.loads(body) if body else {}
            if url.path.startswith(API + "/"):
                self._iaas(self.command, url.path.removeprefix(API), query, payload)
            elif url.path == "/n" or url.path.startswith("/n/"):
                self._object_storage(self.command, url.path, query)
            else:
                raise OciError(404, "NotAuthorizedOrNotFound", f"{url.path} not found")
        except OciError as exc:
            self._send(exc.status, {"code": exc.code, "message": exc.message})

    do_GET = do_POST = do_DELETE = do_HEAD = do_PUT = _dispatch  # noqa: N815

    # ---- the request signature ---------------------------------------------------------

    def _check_signature(self, body: bytes) -> None:
        state = self.state
        refused = OciError(401, "NotAuthenticated", "The required information to complete "
                                                    "authentication was not provided or was "
                                                    "incorrect.")
        header = self.headers.get("Authorization", "")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', header))
        key_id = f"{state.tenancy}/{state.user}/{state.fingerprint}"
        if not header.startswith("Signature ") or fields.get("keyId") != key_id \
                or fields.get("algorithm") != "rsa-sha256":
            state.unsigned += 1
            raise refused
        signed = fields.get("headers", "").split()
        needed = {"date", "(request-target)", "host"}
        if self.command in ("POST", "PUT") and body:
            needed |= {"content-length", "content-type", "x-content-sha256"}
            digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
            if self.headers.get("x-content-sha256") != digest:
                state.unsigned += 1
                raise refused
        if not needed <= set(signed):
            state.unsigned += 1
            raise refused
        lines = [f"(request-target): {self.command.lower()} {self.path}"
                 if name == "(request-target)" else f"{name}: {self.headers.get(name, '')}"
                 for name in signed]
        try:
            state.public_key.verify(base64.b64decode(fields.get("signature", "")),
                                    "\n".join(lines).encode(), padding.PKCS1v15(),
                                    hashes.SHA256())
        except (InvalidSignature, ValueError):
            state.unsigned += 1
            raise refused from None

    # ---- Compute, Block Storage, Networking, Work Requests -----------------------------

    def _iaas(self, method: str, path: str, query: dict[str, str],
              payload: dict[str, Any]) -> None:
        state = self.state
        if method == "GET" and path == "/instances":
            self._send(200, [_public(i) for i in state.instances.values()
                             if i["compartmentId"] == query.get("compartmentId")])
            return
        if match := re.fullmatch(r"/instances/([\w.]+)", path):
            instance = self._get(state.instances, match.group(1))
            if method == "POST":
                action = query.get("action")
                if action not in ("SOFTSTOP", "STOP", "START"):
                    raise OciError(400, "InvalidParameter", f"unknown action {action!r}")
                state.actions.append((instance["id"], action))
                instance["lifecycleState"] = (
                    "RUNNING" if action == "START"
                    else "STOPPING" if action == "SOFTSTOP" and instance["id"] in state.deaf
                    else "STOPPED")
            self._send(200, _public(instance))
            return
        kinds = {"/bootVolumeAttachments": "boot", "/volumeAttachments": "volume",
                 "/vnicAttachments": "vnic"}
        if method == "GET" and path in kinds:
            self._send(200, [_public(a) for a in state.attachments
                             if a["kind"] == kinds[path]
                             and a["instanceId"] == query.get("instanceId")
                             and a["compartmentId"] == query.get("compartmentId")])
            return
        tables = {"bootVolumes": state.boot_volumes, "volumes": state.volumes,
                  "vnics": state.vnics, "workRequests": state.work_requests}
        if method == "GET" and (match := re.fullmatch(r"/(\w+)/([\w.]+)", path)) \
                and match.group(1) in tables:
            self._send(200, _public(self._get(tables[match.group(1)], match.group(2))))
            return
        if path == "/images" and method == "POST":
            self._send(200, self._create_image(payload))
            return
        if path == "/images" and method == "GET":
            self._send(200, [_public(i) for i in state.images.values()
                             if i["compartmentId"] == query.get("compartmentId")])
            return
        if match := re.fullmatch(r"/images/([\w.]+)(/actions/export)?", path):
            image = self._get(state.images, match.group(1))
            if method == "GET" and not match.group(2):
                self._send(200, _public(image))
                return
            if method == "DELETE" and not match.group(2):
                if image["lifecycleState"] == "EXPORTING":
                    raise OciError(409, "Conflict", "the image is being exported")
                with state.lock:
                    del state.images[image["id"]]
                self._send(204)
                return
            if method == "POST" and match.group(2):
                self._export_image(image, payload)
                return
        raise OciError(400, "NotSupported", f"hypersdk's OCI stand-in does not serve {method} "
                                            f"{path}")

    def _create_image(self, payload: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        instance = self._get(state.instances, payload.get("instanceId", ""))
        if payload.get("compartmentId") != instance["compartmentId"]:
            raise OciError(400, "InvalidParameter", "compartmentId does not match the instance")
        image_id = _ocid("image")
        raw = state.work / f"{image_id}.raw"
        subprocess.run(["cp", "--sparse=always", instance["_raw"], str(raw)], check=True)
        image = {"id": image_id, "compartmentId": payload["compartmentId"],
                 "displayName": payload.get("displayName") or image_id,
                 "freeformTags": payload.get("freeformTags") or {},
                 "lifecycleState": "PROVISIONING", "createImageAllowed": True,
                 "baseImageId": None, "timeCreated": NOW, "_raw": str(raw)}
        with state.lock:
            state.images[image_id] = image
            state.captured.append((instance["id"], instance["lifecycleState"]))
        answer = _public(image)
        image["lifecycleState"] = "AVAILABLE"  # at the next GET, as a short provisioning
        return answer

    def _export_image(self, image: dict[str, Any], payload: dict[str, Any]) -> None:
        state = self.state
        if (payload.get("destinationType") != "objectStorageTuple"
                or payload.get("namespaceName") != state.namespace
                or payload.get("exportFormat") not in ("QCOW2", "VMDK", "VHD", "VDI", "OCI")):
            raise OciError(400, "InvalidParameter", f"cannot export to {payload}")
        request_id = _ocid("workrequest")
        with state.lock:
            image["lifecycleState"] = "EXPORTING"
            state.work_requests[request_id] = {
                "id": request_id, "operationType": "ExportImage", "status": "ACCEPTED",
                "compartmentId": image["compartmentId"], "percentComplete": 0.0,
                "timeAccepted": NOW, "resources": [{"entityType": "image",
                                                    "actionType": "IN_PROGRESS",
                                                    "identifier": image["id"]}]}
        threading.Thread(target=_run_export, daemon=True,
                         args=(state, request_id, image, payload["bucketName"],
                               payload["objectName"])).start()
        self._send(200, _public(image), headers={"opc-work-request-id": request_id})

    def _get(self, table: dict[str, Any], key: str) -> Any:
        with self.state.lock:
            found = table.get(key)
        if found is None:
            raise OciError(404, "NotAuthorizedOrNotFound",
                           f"Authorization failed or requested resource not found: {key}")
        return found

    # ---- Object Storage ----------------------------------------------------------------

    def _object_storage(self, method: str, path: str, query: dict[str, str]) -> None:
        state = self.state
        if path in ("/n", "/n/") and method == "GET":
            self._send(200, state.namespace)
            return
        match = re.fullmatch(r"/n/([^/]+)/b/([^/]+)/o(?:/(.+))?", path)
        if not match or match.group(1) != state.namespace:
            raise OciError(404, "BucketNotFound", f"{path}: no such bucket")
        bucket, name = match.group(2), unquote(match.group(3) or "")
        if not name and method == "GET":
            prefix = query.get("prefix", "")
            self._send(200, {"objects": [{"name": n} for b, n in sorted(state.objects)
                                         if b == bucket and n.startswith(prefix)]})
            return
        with state.lock:
            stored = state.objects.get((bucket, name))
        if stored is None:
            raise OciError(404, "ObjectNotFound", f"The object '{name}' was not found in the "
                                                  f"bucket '{bucket}'")
        if method == "DELETE":
            with state.lock:
                del state.objects[(bucket, name)]
            stored.unlink(missing_ok=True)
            self._send(204)
            return
        data = stored.read_bytes()
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        crc = base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
        if len(data) > state.multipart_above:
            digests = b"".join(hashlib.md5(data[o:o + state.multipart_above]).digest()
                               for o in range(0, len(data), state.multipart_above))
            parts = -(-len(data) // state.multipart_above)
            sums = {"opc-multipart-md5":
                    f"{base64.b64encode(hashlib.md5(digests).digest()).decode()}-{parts}"}
        else:
            sums = {"content-md5": md5}
        if method == "HEAD":
            self.send_response(200)
            for key, value in (("Content-Length", str(len(data))), *sums.items(),
                               ("opc-content-crc32c", crc), ("etag", md5),
                               ("opc-request-id", uuid.uuid4().hex)):
                self.send_header(key, value)
            self.end_headers()
            return
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if not ranged:
            self._send(200, raw=data, headers={"content-md5": md5})
            return
        start, end = int(ranged.group(1)), min(int(ranged.group(2)), len(data) - 1)
        with state.lock:
            left = state.fail.get(start, 0)
            if left:
                state.fail[start] = left - 1
        if left:
            raise OciError(503, "ServiceUnavailable", "try again")
        if start in state.corrupt:
            data = data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1:]
        self._send(206, raw=data[start:end + 1],
                   headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})


def api_key() -> tuple[bytes, Any, str]:
    """(private key PEM, public key, fingerprint as OCI shows it: MD5 of the DER key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    fingerprint = ":".join(f"{b:02x}" for b in hashlib.md5(der).digest())
    return private, key.public_key(), fingerprint


def start_standin(*, port: int) -> StandIn:
    """The stand-in with a tenancy, a user and that user's API key file of its own."""
    work = Path(tempfile.mkdtemp(prefix="oci-standin-", dir="/var/tmp"))
    private, public, fingerprint = api_key()
    state = State(tenancy=_ocid("tenancy"), user=_ocid("user"), fingerprint=fingerprint,
                  public_key=public, namespace=f"hypersdk{secrets.token_hex(3)}", work=work)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="oci-standin").start()
    key_file = work / "api-key.pem"
    key_file.write_bytes(private)
    key_file.chmod(0o600)
    return StandIn(state, server, key_file)
