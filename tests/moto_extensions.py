"""moto's server with what it lacks for hypersdk's AWS provider, added the way a patch to
moto would add it (methods on its EC2/EBS responses and back-ends, answers serialised
from boto3's own service model). Run as a process: `python -m tests.moto_extensions PORT`
prints `ready ACCESS_KEY SECRET_KEY` once it listens.

Measured against moto 5.2, what is added:

* `create_instance_export_task`, `describe_export_tasks` (with tag filters),
  `cancel_export_task`: the task turns `completed` once an OVA (our OVF + a
  stream-optimized VMDK of the instance's volume, as VM Export writes) is in the bucket.
* An EC2 snapshot (`create_snapshot(s)`) is registered with moto's EBS back-end holding
  its volume's data, in 512 KiB blocks (what AWS uses; moto says 512) with SHA-256
  checksums; blocks that are all zeros are not listed, as on AWS. `delete_snapshot`
  removes it from EBS too; an unknown snapshot is a 404 ResourceNotFoundException
  (moto: a 500). `list_snapshot_blocks` pages with `MaxResults`/`NextToken` (moto: one
  page), at most PAGE_CAP blocks a page. `list_changed_blocks` compares two EC2 snapshots of
  one volume block by block (moto: only the first snapshot's blocks, EBS-direct
  snapshots only), paged the same way.
* `register_image` takes `Architecture`, `BootMode` and `Platform`-like descriptions;
  an instance reports its image's `BootMode`, as EC2 does.
* Authentication: moto's own IAM checks are on (every request is signed by a known
  access key of a user with a policy); the key pair of that user is printed at start.
* A new S3 bucket has Object Ownership "bucket owner enforced" (ACLs disabled), as every
  bucket made since April 2023 (moto: none, so ACLs on) unless `x-amz-object-ownership`
  says otherwise.
* Assumed-role credentials expire, as on AWS: a request signed with them after their
  `Expiration` is refused, `ExpiredToken` (400; `ExpiredTokenException`, 403, from the
  JSON services such as EBS), where moto accepts them forever. A role tagged
  `moto-test:session-seconds` = N hands out credentials that expire after N seconds (AWS's
  shortest is 900 s; a test cannot wait that long).

A volume's content and faults are set through the API, with tags on the volume (so
that product code and tests talk to this server only over HTTP):
`moto-test:content` = path of a raw file holding the volume's first bytes;
`moto-test:fail-blocks` = `INDEX:TIMES,...` (those block reads answer 500 that many
times); `moto-test:corrupt-blocks` = `INDEX,...` (their checksum is wrong);
`moto-test:block-delay` = seconds each block read takes;
`moto-test:throttle-seconds` = N: from its first block read on, for N seconds, every
block read of its snapshots answers RequestThrottledException (HTTP 400, as EBS does);
with `moto-test:throttle-after-blocks` = K, from the read after K blocks were served;
`moto-test:snapshot-seconds` = N: its snapshots are `pending` for N seconds, their
`Progress` rising, and the EBS direct APIs refuse them until `completed` (moto: completed
at once); `moto-test:snapshot-invisible-seconds` = N: for N seconds after it is made,
`describe_snapshots` of its snapshot answers InvalidSnapshot.NotFound (EC2 is eventually
consistent: a new resource may not be visible to the next call).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from moto import settings
from moto.core.exceptions import JsonRESTError, ServiceException, _RESTError
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.ebs.models import EBSSnapshot, ebs_backends
from moto.ebs.responses import EBSResponse
from moto.ec2.exceptions import InvalidSnapshotIdError
from moto.ec2.models import EC2Backend
from moto.ec2.models.elastic_block_store import Snapshot
from moto.ec2.models.instances import Instance
from moto.ec2.responses import EC2Response
from moto.iam.access_control import (
    AssumedRoleAccessKey,
    CreateAccessKeyFailure,
    IAMRequest,
    IAMRequestBase,
    S3IAMRequest,
)
from moto.iam.models import iam_backends
from moto.s3.models import S3Backend, s3_backends
from moto.sts.models import STSBackend, sts_backends

ACCOUNT = "123456789012"
BLOCK_SIZE = 512 * 1024
PAGE_CAP = 8
TAG = "moto-test:"

_lock = threading.Lock()
_failures_left: dict[tuple[str, int], int] = {}
_first_read: dict[str, float] = {}  # snapshot id → its first block read (monotonic)
_served: dict[str, int] = {}  # snapshot id → blocks served
_export_tasks: dict[str, dict[str, Any]] = {}


def ResourceNotFound(message: str) -> ServiceException:  # noqa: N802 - as moto names errors
    return ServiceException("ResourceNotFoundException", message)


def ServiceUnavailable(message: str) -> ServiceException:  # noqa: N802
    return ServiceException("InternalServerException", message)


def InvalidParameter(message: str) -> ServiceException:  # noqa: N802
    return ServiceException("InvalidParameterValue", message)


def _tags(resource: Any) -> dict[str, str]:
    return {t["key"]: t["value"] for t in resource.get_tags()}


def _content(volume: Any) -> bytes:
    path = _tags(volume).get(f"{TAG}content")
    return Path(path).read_bytes() if path else b""


# ---- EC2 snapshots known to EBS ----------------------------------------------------------


def _register_with_ebs(backend: EC2Backend, snapshot: Any) -> None:
    ebs = ebs_backends[backend.account_id][backend.region_name]
    registered = EBSSnapshot(account_id=backend.account_id, snapshot=snapshot)
    registered.block_size = BLOCK_SIZE
    registered.status = "completed"
    data = _content(snapshot.volume)
    for index in range(0, (len(data) + BLOCK_SIZE - 1) // BLOCK_SIZE):
        block = data[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE].ljust(BLOCK_SIZE, b"\0")
        if block.count(0) == BLOCK_SIZE:
            continue
        checksum = base64.b64encode(hashlib.sha256(block).digest()).decode()
        registered.put_block(index, block, checksum, "SHA256", BLOCK_SIZE)
    ebs.snapshots[registered.snapshot_id] = registered


_create_snapshot = EC2Backend.create_snapshot
_delete_snapshot = EC2Backend.delete_snapshot
_describe_snapshots = EC2Backend.describe_snapshots
_made_at: dict[str, float] = {}  # snapshot id → when it was made (monotonic)


def create_snapshot(self: EC2Backend, volume_id: str, description: str,
                    owner_id: str | None = None, from_ami: str | None = None) -> Any:
    snapshot = _create_snapshot(self, volume_id, description, owner_id, from_ami)
    if not from_ami:
        _register_with_ebs(self, snapshot)
        _made_at[snapshot.id] = time.monotonic()
        _advance(snapshot)
    return snapshot


def _since_made(snapshot: Any) -> float:
    return time.monotonic() - _made_at.get(snapshot.id, float("-inf"))


def _advance(snapshot: Any) -> None:
    """A snapshot's state and progress by the time since it was made."""
    seconds = float(_tags(snapshot.volume).get(f"{TAG}snapshot-seconds", 0))
    done = min(1.0, _since_made(snapshot) / seconds) if seconds else 1.0
    snapshot.status = "completed" if done >= 1.0 else "pending"
    snapshot.moto_test_progress = f"{int(done * 100)}%"


def describe_snapshots(self: EC2Backend, snapshot_ids: list[str] | None = None,
                       filters: Any = None) -> list[Any]:
    for snapshot_id in snapshot_ids or []:
        snapshot = self.snapshots.get(snapshot_id)
        if snapshot is not None and _since_made(snapshot) < float(
                _tags(snapshot.volume).get(f"{TAG}snapshot-invisible-seconds", 0)):
            raise InvalidSnapshotIdError()
    matches = _describe_snapshots(self, snapshot_ids, filters)
    for snapshot in matches:
        if snapshot.id in _made_at:
            _advance(snapshot)
    return matches


def delete_snapshot(self: EC2Backend, snapshot_id: str) -> Any:
    result = _delete_snapshot(self, snapshot_id)
    ebs_backends[self.account_id][self.region_name].snapshots.pop(snapshot_id, None)
    return result


# ---- EBS direct APIs ----------------------------------------------------------------------


def _ebs_snapshot(response: EBSResponse, snapshot_id: str) -> EBSSnapshot:
    snapshot = response.ebs_backend.snapshots.get(snapshot_id)
    if snapshot is None:
        raise ResourceNotFound(f"The snapshot '{snapshot_id}' does not exist.")
    made = response.ebs_backend.ec2_backend.snapshots.get(snapshot_id)
    if made is not None and snapshot_id in _made_at:
        _advance(made)
        if made.status != "completed":
            raise ServiceException("ValidationException",
                                   f"The snapshot '{snapshot_id}' is not completed yet.")
    return snapshot


def list_snapshot_blocks(self: EBSResponse) -> ActionResult:
    snapshot = _ebs_snapshot(self, self._get_param("SnapshotId"))
    limit = min(int(self._get_param("MaxResults") or 10000), PAGE_CAP)
    start = int(self._get_param("NextToken") or self._get_param("StartingBlockIndex") or 0)
    indexes = sorted(i for i in snapshot.blocks if i >= start)
    page, rest = indexes[:limit], indexes[limit:]
    result = {
        "Blocks": [{"BlockIndex": i, "BlockToken": snapshot.blocks[i].block_token}
                   for i in page],
        "VolumeSize": snapshot.volume_size,
        "BlockSize": snapshot.block_size,
        "ExpiryTime": time.time() + 3600,
    }
    if rest:
        result["NextToken"] = str(rest[0])
    return ActionResult(result)


def list_changed_blocks(self: EBSResponse) -> ActionResult:
    """The blocks whose bytes differ between two snapshots of one volume (moto: only
    blocks of the first snapshot, and only EBS-direct snapshots), paged; without a first
    snapshot, every block of the second."""
    first_id, second_id = self._get_param("FirstSnapshotId"), self._get_param("SecondSnapshotId")
    second = _ebs_snapshot(self, second_id)
    first = _ebs_snapshot(self, first_id) if first_id else None
    if first is not None:
        made = self.ebs_backend.ec2_backend.snapshots
        volumes = {getattr(made.get(i), "volume", None) for i in (first_id, second_id)}
        if len(volumes) != 1 or None in volumes:
            raise ServiceException("ValidationException", f"The snapshots {first_id} and "
                                   f"{second_id} are not of the same volume.")
    before = first.blocks if first is not None else {}
    changed = sorted(i for i in set(before) | set(second.blocks)
                     if i not in before or i not in second.blocks
                     or before[i].block_data != second.blocks[i].block_data)
    limit = min(int(self._get_param("MaxResults") or 10000), PAGE_CAP)
    start = int(self._get_param("NextToken") or self._get_param("StartingBlockIndex") or 0)
    indexes = [i for i in changed if i >= start]
    page, rest = indexes[:limit], indexes[limit:]
    blocks = []
    for index in page:
        entry: dict[str, Any] = {"BlockIndex": index}
        if index in before:
            entry["FirstBlockToken"] = before[index].block_token
        if index in second.blocks:
            entry["SecondBlockToken"] = second.blocks[index].block_token
        blocks.append(entry)
    result = {"ChangedBlocks": blocks, "VolumeSize": second.volume_size,
              "BlockSize": second.block_size, "ExpiryTime": time.time() + 3600}
    if rest:
        result["NextToken"] = str(rest[0])
    return ActionResult(result)


def _block_faults(snapshot_id: str, backend: EC2Backend) -> dict[str, str]:
    snapshot = backend.snapshots.get(snapshot_id)
    return _tags(snapshot.volume) if snapshot is not None else {}


def get_snapshot_block(self: EBSResponse) -> ActionResult:
    snapshot_id = self._get_param("SnapshotId")
    index = int(self._get_param("BlockIndex"))
    snapshot = _ebs_snapshot(self, snapshot_id)
    block = snapshot.blocks.get(index)
    if block is None or self._get_param("BlockToken") != block.block_token:
        raise ResourceNotFound(f"block {index} of {snapshot_id} is not in the snapshot")
    tags = _block_faults(snapshot_id, self.ebs_backend.ec2_backend)
    throttled = float(tags.get(f"{TAG}throttle-seconds", 0))
    if throttled:
        with _lock:
            first = (_first_read.setdefault(snapshot_id, time.monotonic())
                     if _served.get(snapshot_id, 0) >= int(tags.get(
                         f"{TAG}throttle-after-blocks", 0)) else None)
        if first is not None and time.monotonic() - first < throttled:
            raise ServiceException("RequestThrottledException", "Rate exceeded")
    delay = float(tags.get(f"{TAG}block-delay", 0))
    if delay:
        time.sleep(delay)
    for entry in filter(None, tags.get(f"{TAG}fail-blocks", "").split(",")):
        failing, times = (int(x) for x in entry.split(":"))
        if failing == index:
            with _lock:
                left = _failures_left.setdefault((snapshot_id, index), times)
                if left > 0:
                    _failures_left[(snapshot_id, index)] = left - 1
                    raise ServiceUnavailable(f"block {index}: try again")
    with _lock:
        _served[snapshot_id] = _served.get(snapshot_id, 0) + 1
    checksum = block.checksum
    corrupt = {int(x) for x in filter(None, tags.get(f"{TAG}corrupt-blocks", "").split(","))}
    if index in corrupt:
        checksum = base64.b64encode(hashlib.sha256(b"not this block").digest()).decode()
    return ActionResult({"DataLength": block.data_length, "BlockData": block.block_data,
                         "Checksum": checksum, "ChecksumAlgorithm": block.checksum_algorithm})


# ---- images and instances -------------------------------------------------------------------


_register_image = EC2Response.register_image


def register_image(self: EC2Response) -> ActionResult:
    result = _register_image(self)
    image = self.ec2_backend.amis[result.result["ImageId"]]  # type: ignore[index]
    image.architecture = self._get_param("Architecture") or "x86_64"
    image.boot_mode = self._get_param("BootMode") or "legacy-bios"
    image.root_device_name = self._get_param("RootDeviceName") or image.root_device_name
    if "windows" in (self._get_param("Description") or "").lower():
        image.platform = "windows"
    return result


_instance_init = Instance.__init__


def instance_init(self: Instance, ec2_backend: Any, image_id: str, *args: Any,
                  **kwargs: Any) -> None:
    _instance_init(self, ec2_backend, image_id, *args, **kwargs)
    image = ec2_backend.amis.get(image_id)
    self.boot_mode = getattr(image, "boot_mode", None)  # type: ignore[attr-defined]
    if image is not None and image.architecture:
        self.architecture = image.architecture


# ---- VM Export --------------------------------------------------------------------------------


def _ovf(name: str, disk: str, capacity: int, size: int) -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:href="{disk}" ovf:id="file1" ovf:size="{size}"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1"
    ovf:fileRef="file1"
    ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="{name}"><Info>exported by VM Export</Info></VirtualSystem>
</Envelope>
"""


def _build_ova(instance: Any, volume: Any) -> bytes:
    with tempfile.TemporaryDirectory() as work:
        raw, vmdk = Path(work) / "disk.raw", Path(work) / "disk.vmdk"
        with raw.open("wb") as out:
            out.write(_content(volume))
            out.truncate(volume.size << 30)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o",
                        "subformat=streamOptimized", str(raw), str(vmdk)], check=True)
        disk_name = f"{instance.id}-disk-1.vmdk"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as ova:
            descriptor = _ovf(instance.id, disk_name, volume.size << 30,
                              vmdk.stat().st_size).encode()
            info = tarfile.TarInfo(f"{instance.id}.ovf")
            info.size = len(descriptor)
            ova.addfile(info, io.BytesIO(descriptor))
            ova.add(vmdk, arcname=disk_name)
        return buffer.getvalue()


# VM Import/Export's account in us-east-1 (and most regions), as its user guide names it
_VM_EXPORT_ACCOUNT = "c4d8eabf8db69dbe46bfe0e517100c554f01200b104d59cd408e777ba442a322"


def _export_allowed(bucket: Any) -> bool:
    """VM Export writes as its own account: the bucket's ACL must grant it WRITE and
    READ_ACP, and ACLs must be on (a bucket-owner-enforced bucket ignores grants)."""
    if "BucketOwnerEnforced" in str(bucket.ownership_rule) or bucket.acl is None:
        return False
    granted = {p for grant in bucket.acl.grants for p in grant.permissions
               if any(g.id == _VM_EXPORT_ACCOUNT for g in grant.grantees)}
    return "FULL_CONTROL" in granted or {"WRITE", "READ_ACP"} <= granted


def _run_export(task: dict[str, Any], instance: Any, volume: Any, account: str) -> None:
    s3 = s3_backends[account]["aws"]
    spec = task["ExportToS3Task"]
    if not _export_allowed(s3.get_bucket(spec["S3Bucket"])):
        with _lock:  # a task that fails ends cancelled (State has no "failed"), saying why
            task["State"], task["StatusMessage"] = "cancelled", (
                "ERROR: Insufficient permissions - please verify bucket ownership and write "
                f"permissions on the bucket: {spec['S3Bucket']}")
        return
    data = _build_ova(instance, volume)
    s3.put_object(spec["S3Bucket"], spec["S3Key"], data)
    with _lock:
        if task["State"] == "active":
            task["State"] = "completed"


def create_instance_export_task(self: EC2Response) -> ActionResult:
    instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
    target = self._get_param("TargetEnvironment")
    if target not in ("citrix", "vmware", "microsoft"):
        raise InvalidParameter(f"TargetEnvironment {target!r} is not valid")
    spec = self._get_param("ExportToS3Task") or {}
    bucket = spec.get("S3Bucket")
    if not bucket or bucket not in s3_backends[self.current_account]["aws"].buckets:
        raise InvalidParameter(f"the S3 bucket {bucket!r} does not exist")
    volumes = [m.volume_id for _, m in instance.get_block_device_mapping]
    if len(volumes) != 1:
        raise InvalidParameter("VM Export takes instances with one volume")
    task_id = f"export-{instance.id}-{len(_export_tasks)}"
    key = f"{spec.get('S3Prefix', '')}{task_id}.{spec.get('ContainerFormat', 'ova')}"
    tags = [t for s in self._get_param("TagSpecifications") or [] for t in s.get("Tags", [])]
    task = {
        "ExportTaskId": task_id, "Description": self._get_param("Description") or "",
        "State": "active", "StatusMessage": "",
        "InstanceExportDetails": {"InstanceId": instance.id, "TargetEnvironment": target},
        "ExportToS3Task": {"ContainerFormat": spec.get("ContainerFormat", "ova"),
                           "DiskImageFormat": spec.get("DiskImageFormat", "VMDK"),
                           "S3Bucket": bucket, "S3Key": key},
        "Tags": tags,
    }
    _export_tasks[task_id] = task
    volume = self.ec2_backend.get_volume(volumes[0])
    threading.Thread(target=_run_export, args=(task, instance, volume, self.current_account),
                     daemon=True).start()
    return ActionResult({"ExportTask": task})


def describe_export_tasks(self: EC2Response) -> ActionResult:
    ids = self._get_param("ExportTaskIds") or []
    tasks = [t for t in _export_tasks.values() if not ids or t["ExportTaskId"] in ids]
    for flt in self._get_param("Filters") or []:
        name, values = flt["Name"], flt.get("Values") or []
        if name.startswith("tag:"):
            key = name[4:]
            tasks = [t for t in tasks
                     if any(x["Key"] == key and x["Value"] in values for x in t["Tags"])]
        elif name == "export-task-id":
            tasks = [t for t in tasks if t["ExportTaskId"] in values]
        else:
            raise InvalidParameter(f"unknown filter {name!r}")
    if ids and len(tasks) < len(ids):
        raise ServiceException("InvalidExportTaskID.NotFound", "The export task ID does not exist")
    return ActionResult({"ExportTasks": tasks})


def cancel_export_task(self: EC2Response) -> ActionResult:
    task = _export_tasks.get(self._get_param("ExportTaskId"))
    if task is None:
        raise ServiceException("InvalidExportTaskID.NotFound", "The export task ID does not exist")
    with _lock:
        if task["State"] == "active":
            task["State"] = "cancelled"
    return ActionResult({})


# ---- signatures of requests without a body -------------------------------------------------

_create_aws_request = IAMRequestBase._create_aws_request


def create_aws_request(self: IAMRequestBase) -> Any:
    """moto signs a GET's parsed query parameters as if they were its body (EBS's
    `GET /snapshots/{id}/blocks?maxResults=...` fails SignatureDoesNotMatch): a request
    without a body is signed with an empty one, as botocore does."""
    request = _create_aws_request(self)
    if self._method in ("GET", "HEAD", "DELETE") and not self._body:
        request.data = b""
    return request


# ---- assumed-role credentials that expire ------------------------------------------------

EXPIRED = "The security token included in the request is expired"


class ExpiredToken(_RESTError):
    code = 400

    def __init__(self) -> None:
        super().__init__("ExpiredToken", EXPIRED)


class ExpiredTokenException(JsonRESTError):
    code = 403

    def __init__(self) -> None:
        super().__init__("ExpiredTokenException", EXPIRED)


_assume_role = STSBackend.assume_role


def assume_role(self: STSBackend, region_name: str, role_session_name: str, role_arn: str,
                policy: str, duration: int, external_id: str) -> Any:
    try:
        role = iam_backends[ACCOUNT]["global"].get_role_by_arn(role_arn)
    except Exception:  # noqa: BLE001 - a role of another account: as moto has it
        role = None
    tags = {tag["Key"]: tag["Value"] for tag in role.tags} if role is not None else {}
    if f"{TAG}session-seconds" in tags:
        duration = int(tags[f"{TAG}session-seconds"])
    return _assume_role(self, region_name=region_name, role_session_name=role_session_name,
                        role_arn=role_arn, policy=policy, duration=duration,
                        external_id=external_id)


_assumed_key_init = AssumedRoleAccessKey.__init__


def assumed_key_init(self: AssumedRoleAccessKey, account_id: str, partition: str,
                     access_key_id: str, headers: dict[str, str]) -> None:
    _assumed_key_init(self, account_id, partition, access_key_id, headers)
    for role in sts_backends[account_id][partition].assumed_roles:
        if role.access_key_id == access_key_id and utcnow() >= role.expiration:
            raise CreateAccessKeyFailure(reason="ExpiredToken")


def _expiring(original: Any) -> Any:
    def raise_invalid_access_key(self: IAMRequestBase, reason: str) -> None:
        if reason == "ExpiredToken":
            if self._service in ("ebs",):
                raise ExpiredTokenException()
            raise ExpiredToken()
        original(self, reason)
    return raise_invalid_access_key


_create_bucket = S3Backend.create_bucket


def create_bucket(self: S3Backend, *args: Any, **kwargs: Any) -> Any:
    bucket = _create_bucket(self, *args, **kwargs)
    bucket.ownership_rule = "BucketOwnerEnforced"  # the request's header, if any, follows
    return bucket


def install() -> None:
    S3Backend.create_bucket = create_bucket  # type: ignore[method-assign]
    STSBackend.assume_role = assume_role  # type: ignore[method-assign]
    AssumedRoleAccessKey.__init__ = assumed_key_init  # type: ignore[method-assign]
    IAMRequest._raise_invalid_access_key = _expiring(  # type: ignore[method-assign]
        IAMRequest._raise_invalid_access_key)
    S3IAMRequest._raise_invalid_access_key = _expiring(  # type: ignore[method-assign]
        S3IAMRequest._raise_invalid_access_key)
    IAMRequestBase._create_aws_request = create_aws_request  # type: ignore[method-assign]
    EC2Backend.create_snapshot = create_snapshot  # type: ignore[method-assign]
    EC2Backend.delete_snapshot = delete_snapshot  # type: ignore[method-assign]
    EC2Backend.describe_snapshots = describe_snapshots  # type: ignore[method-assign]
    Snapshot.progress = property(  # type: ignore[method-assign,assignment]
        lambda self: getattr(self, "moto_test_progress", "100%"))
    EBSResponse.list_snapshot_blocks = list_snapshot_blocks  # type: ignore[method-assign]
    EBSResponse.get_snapshot_block = get_snapshot_block  # type: ignore[method-assign]
    EBSResponse.list_changed_blocks = list_changed_blocks  # type: ignore[method-assign]
    EC2Response.register_image = register_image  # type: ignore[method-assign]
    EC2Response.create_instance_export_task = create_instance_export_task  # type: ignore[attr-defined]
    EC2Response.describe_export_tasks = describe_export_tasks  # type: ignore[attr-defined]
    EC2Response.cancel_export_task = cancel_export_task  # type: ignore[attr-defined]
    Instance.__init__ = instance_init  # type: ignore[method-assign]


def admin_keys() -> tuple[str, str]:
    """A user allowed everything, and its access key: what the tests sign with."""
    iam = iam_backends[ACCOUNT]["global"]
    iam.create_user(region_name="us-east-1", user_name="hypersdk-test", path="/")
    policy = iam.create_policy(description="", path="/", policy_name="everything",
                               tags=[], policy_document=json.dumps({
                                   "Version": "2012-10-17",
                                   "Statement": [{"Effect": "Allow", "Action": "*",
                                                  "Resource": "*"}]}))
    iam.attach_user_policy(policy.arn, "hypersdk-test")
    key = iam.create_access_key("hypersdk-test")
    return key.access_key_id, key.secret_access_key


def main() -> None:
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    port = int(sys.argv[1])
    install()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    access, secret = admin_keys()
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is checked
    print(f"ready {access} {secret}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
