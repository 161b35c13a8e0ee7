"""Getting an EC2 instance's disks out of AWS.

* `ebs` (default): `create_snapshots` of all its volumes at one point in time, then each
  snapshot's blocks read with the EBS direct APIs (`list_snapshot_blocks`,
  `get_snapshot_block`) in parallel into a sparse raw file, every block's SHA-256 checked.
* `export-task`: `create_instance_export_task` into `providers.aws.export_bucket` (an OVA
  holding a stream-optimized VMDK), then the object read with parallel ranged GETs.

Whatever is made in the account (snapshots, export task, S3 object) carries the job's tag
and is removed at the end, on failure, and by `discard` after a cancel or crash, unless
`options.keep_snapshots`; a transient failure leaves it for the task's retry to use
(`providers.retained`)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions

from core.errors import InvalidRequest, NotFound, ProviderError, VerificationError
from core.models import Blocker, ExportedFile, ExportOptions, PowerState, VMInfo
from hyper2kvm.vmdk import parse_vmdk
from providers.aws.session import Clients, call, map_error
from providers.objects import read_object
from providers.packaging import RAW, FetchedDisk, Hashed, export_disks
from providers.power import power_for_export
from providers.ranged import Part, RangedFile, Reading, map_in_context, read_ranges
from providers.retained import kept

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
JOB_TAG = "hypersdk:job"
MAX_EXPORT_TASK_VOLUME = 1 << 40  # VM Export refuses volumes over 1 TiB
# the canonical ids of VM Import/Export's account, which the export bucket's ACL must grant
# WRITE and READ_ACP (the VM Import/Export User Guide, "Prerequisites" of instance export)
VM_EXPORT_GRANTEES = {
    "af-south-1": "3f7744aeebaf91dd60ab135eb1cf908700c8d2bc9133e61261e6c582be6e33ee",
    "ap-east-1": "97ee7ab57cc9b5034f31e107741a968e595c0d7a19ec23330eae8d045a46edfb",
    "eu-south-1": "04636d9a349e458b0c1cbf1421858b9788b4ec28b066148d4907bb15c52b5b9c",
    "me-south-1": "aa763f2cf70006650562c62a09433f04353db3cba6ba6aeb3550fdc8065d3d9f",
    "cn-north-1": "834bafd86b15b6ca71074df0fd1f93d234b9d5e848a2cb31f880c149003ce36f",
    "cn-northwest-1": "834bafd86b15b6ca71074df0fd1f93d234b9d5e848a2cb31f880c149003ce36f",
    "us-gov-west-1": "af913ca13efe7a94b88392711f6cfc8aa07c9d1454d4f190a624b126733a5602",
}
VM_EXPORT_GRANTEE = "c4d8eabf8db69dbe46bfe0e517100c554f01200b104d59cd408e777ba442a322"
_X86 = {"x86_64", "i386", "x86_64_mac"}


def transport_of(options: ExportOptions) -> str:
    return "ebs" if options.transport == "auto" else options.transport


_DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"}


def bucket_blockers(clients: Clients, bucket: str | None) -> list[Blocker]:
    """VM Export writes into the bucket with an ACL grant to the region's export account:
    a bucket whose Object Ownership is BucketOwnerEnforced (the default of new buckets)
    has ACLs disabled, and the export task fails after it has started."""
    if not bucket:
        return []
    try:
        rules = clients.s3.get_bucket_ownership_controls(Bucket=bucket)[
            "OwnershipControls"]["Rules"]
    except botocore.exceptions.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) == "OwnershipControlsNotFoundError":
            return []  # a bucket from before ownership controls: ACLs on
        raise map_error(exc, f"S3 bucket {bucket}: ownership controls") from None
    if any(rule.get("ObjectOwnership") == "BucketOwnerEnforced" for rule in rules):
        return [Blocker(code="bucket_acls_disabled", message=(
            f"S3 bucket {bucket} has ACLs disabled (Object Ownership: bucket owner "
            "enforced), and VM Export writes with an ACL grant to its account: set Object "
            "Ownership to BucketOwnerPreferred and grant the region's VM Import/Export "
            "account WRITE and READ_ACP on the bucket"))]
    return grant_blockers(clients, bucket)


def grant_blockers(clients: Clients, bucket: str) -> list[Blocker]:
    """The bucket's ACL must grant the region's VM Import/Export account WRITE and
    READ_ACP (FULL_CONTROL holds both), or the task fails once it has run."""
    grantee = VM_EXPORT_GRANTEES.get(clients.region, VM_EXPORT_GRANTEE)
    acl = call(clients.s3.get_bucket_acl, f"S3 bucket {bucket}: ACL", Bucket=bucket)
    granted = {g.get("Permission") for g in acl.get("Grants", [])
               if g.get("Grantee", {}).get("ID") == grantee}
    missing = [p for p in ("WRITE", "READ_ACP")
               if p not in granted and "FULL_CONTROL" not in granted]
    if not missing:
        return []
    return [Blocker(code="bucket_grant_missing", message=(
        f"S3 bucket {bucket} does not grant VM Import/Export's account in {clients.region} "
        f"{' and '.join(missing)}: aws s3api put-bucket-acl --bucket {bucket} "
        f"--grant-write id={grantee} --grant-read-acp id={grantee} "
        "--grant-full-control id=<your canonical id>"))]


def permission_blockers(clients: Clients, vm: VMInfo, options: ExportOptions) -> list[Blocker]:
    """The EC2 calls the export makes, asked with DryRun (EC2 answers DryRunOperation
    when allowed, UnauthorizedOperation when not; nothing is made either way)."""
    calls: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
    if transport_of(options) == "ebs":
        calls.append(("ec2:CreateSnapshots", clients.ec2.create_snapshots,
                      {"InstanceSpecification": {"InstanceId": vm.identifier}}))
    if options.shutdown_vm and vm.power_state == PowerState.POWERED_ON:
        calls.append(("ec2:StopInstances", clients.ec2.stop_instances,
                      {"InstanceIds": [vm.identifier]}))
    blockers = []
    for action, fn, kwargs in calls:
        try:
            fn(DryRun=True, **kwargs)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _DENIED:
                blockers.append(Blocker(code="permission_denied", message=(
                    f"AWS does not allow {action} on {vm.identifier} for these credentials "
                    f"({code}): grant it (the README's AWS policy lists what an export "
                    "needs)")))
            elif code != "DryRunOperation":  # a compatible cloud without DryRun: unchecked
                log.warning("%s on %s not checked with DryRun: %s", action, vm.identifier,
                            map_error(exc, "DryRun"))
        except Exception as exc:  # noqa: BLE001 - mapped (unreachable, refused TLS, ...)
            raise map_error(exc, f"{action} (DryRun) {vm.identifier}") from None
    return blockers


def check_exportable(vm: VMInfo, options: ExportOptions, *, converts: bool,
                     export_bucket: str | None, encrypted: list[str],
                     marketplace: bool) -> None:
    """Refuse, before anything starts, what cannot work: an instance KVM on x86 cannot
    run, a transport AWS does not have, and the documented limits of VM Export."""
    if converts and vm.architecture and vm.architecture not in _X86:
        raise InvalidRequest(f"instance {vm.identifier} is {vm.architecture}: KVM on this "
                             "x86 host cannot run it; export it without conversion "
                             "(hyper2kvm_integration.enabled=false)")
    transport = transport_of(options)
    if transport not in ("ebs", "export-task"):
        raise InvalidRequest(f"options.transport {transport!r} is not an AWS transport; use "
                             "ebs (snapshots read through the EBS direct APIs) or export-task")
    if transport == "ebs":
        return
    limits = []
    if not export_bucket:
        limits.append("providers.aws.export_bucket is not set")
    if (vm.guest_os or "").startswith("win"):
        limits.append("VM Export cannot export Windows instances")
    if marketplace:
        limits.append("VM Export cannot export instances from AWS Marketplace images")
    if len(vm.disks) > 1:
        limits.append(f"VM Export takes one volume, the instance has {len(vm.disks)}")
    if len(vm.nics) > 1:
        limits.append(f"VM Export takes one network interface, the instance has "
                      f"{len(vm.nics)}")
    if encrypted:
        limits.append(f"VM Export cannot export encrypted volumes ({', '.join(encrypted)})")
    if any(d.capacity_bytes > MAX_EXPORT_TASK_VOLUME for d in vm.disks):
        limits.append("VM Export refuses volumes larger than 1 TiB")
    if limits:
        raise InvalidRequest(f"instance {vm.identifier} cannot use transport export-task: "
                             f"{'; '.join(limits)}. Use options.transport=ebs")


# ---- power ------------------------------------------------------------------------------


def _state(clients: Clients, instance_id: str) -> str:
    answer = call(clients.ec2.describe_instances, f"AWS instance {instance_id}",
                  InstanceIds=[instance_id])
    return str(answer["Reservations"][0]["Instances"][0]["State"]["Name"])


def _wait_state(clients: Clients, instance_id: str, wanted: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(clients, instance_id) == wanted:
            return True
        time.sleep(2)
    return False


def stop_instance(clients: Clients, instance_id: str, timeout: float) -> None:
    """Stop the instance (the guest is asked to shut down); forced after `timeout`."""
    call(clients.ec2.stop_instances, f"stop {instance_id}", InstanceIds=[instance_id])
    if _wait_state(clients, instance_id, "stopped", timeout):
        log.info("%s: stopped", instance_id)
        return
    log.warning("%s: not stopped after %.0f s, forcing", instance_id, timeout)
    call(clients.ec2.stop_instances, f"stop {instance_id}", InstanceIds=[instance_id],
         Force=True)
    if not _wait_state(clients, instance_id, "stopped", 600):
        raise ProviderError(f"{instance_id}: did not stop")


def start_instance(clients: Clients, instance_id: str) -> None:
    call(clients.ec2.start_instances, f"start {instance_id}", InstanceIds=[instance_id])
    log.info("%s: started again", instance_id)


# ---- ebs --------------------------------------------------------------------------------


def _tags(job: str | None, instance_id: str) -> list[dict[str, str]]:
    return [{"Key": JOB_TAG, "Value": job or "none"},
            {"Key": "hypersdk:instance", "Value": instance_id}]


def create_snapshots(clients: Clients, vm: VMInfo, job: str | None) -> dict[str, str]:
    """One crash-consistent snapshot of every volume: volume id → snapshot id."""
    answer = call(clients.ec2.create_snapshots, f"create_snapshots {vm.identifier}",
                  InstanceSpecification={"InstanceId": vm.identifier,
                                         "ExcludeBootVolume": False},
                  Description=f"hypersdk export of {vm.identifier}",
                  TagSpecifications=[{"ResourceType": "snapshot",
                                      "Tags": _tags(job, vm.identifier)}])
    snapshots = {s["VolumeId"]: s["SnapshotId"] for s in answer["Snapshots"]}
    log.info("%s: snapshots %s created", vm.identifier,
             ", ".join(f"{s} ({v})" for v, s in snapshots.items()))
    return snapshots


def job_snapshots(clients: Clients, vm: VMInfo, job: str) -> list[dict[str, Any]]:
    """The snapshots of the instance's volumes that `job` made (any attempt, any round)."""
    answer = call(clients.ec2.describe_snapshots, "describe_snapshots", OwnerIds=["self"],
                  Filters=[{"Name": f"tag:{JOB_TAG}", "Values": [job]},
                           {"Name": "tag:hypersdk:instance", "Values": [vm.identifier]}])
    return list(answer.get("Snapshots", []))


def earlier_snapshots(clients: Clients, vm: VMInfo, job: str | None) -> dict[str, str]:
    """The snapshots an earlier attempt of this job made of every volume of the instance
    and left for its retry (volume id → snapshot id); empty unless every volume has one."""
    if not job:
        return {}
    found = {s["VolumeId"]: s["SnapshotId"] for s in job_snapshots(clients, vm, job)
             if s.get("State") != "error"}
    if not found or any(d.datastore not in found for d in vm.disks):
        return {}
    log.info("%s: the snapshots an earlier attempt made are used again: %s", vm.identifier,
             ", ".join(found.values()))
    return found


def wait_snapshots(clients: Clients, snapshot_ids: list[str], *, timeout: float = 6 * 3600,
                   interval: float = 2.0, visible_within: float = 120.0) -> None:
    """Until every snapshot is completed, its progress logged; one in state error fails
    the export. EC2 is eventually consistent: a snapshot just made may be
    InvalidSnapshot.NotFound for a while (`visible_within` seconds at most)."""
    started = time.monotonic()
    deadline = started + timeout
    reported: dict[str, str] = {}
    while True:
        try:
            answer = call(clients.ec2.describe_snapshots, "describe_snapshots",
                          SnapshotIds=snapshot_ids)
        except NotFound:
            if time.monotonic() - started > visible_within:
                raise
            log.info("snapshots %s: not visible yet (EC2 is eventually consistent)",
                     ", ".join(snapshot_ids))
            time.sleep(interval)
            continue
        states = {s["SnapshotId"]: s for s in answer["Snapshots"]}
        for snapshot_id, snapshot in states.items():
            if snapshot["State"] == "error":
                raise ProviderError(f"snapshot {snapshot_id} failed: "
                                    f"{snapshot.get('StateMessage') or 'state error'}")
            if reported.get(snapshot_id) != snapshot.get("Progress"):
                reported[snapshot_id] = snapshot.get("Progress", "")
                log.info("snapshot %s: %s %s", snapshot_id, snapshot["State"],
                         snapshot.get("Progress", ""))
        if all(s["State"] == "completed" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise ProviderError(f"snapshots {', '.join(snapshot_ids)} not completed after "
                                f"{timeout:.0f} s")
        time.sleep(interval)


def delete_snapshots(clients: Clients, snapshot_ids: list[str]) -> None:
    for snapshot_id in snapshot_ids:
        try:
            clients.ec2.delete_snapshot(SnapshotId=snapshot_id)
            log.info("snapshot %s deleted", snapshot_id)
        except Exception as exc:  # noqa: BLE001 - the others are still deleted
            log.warning("snapshot %s not deleted: %s", snapshot_id, map_error(exc, "delete"))


def _snapshot_blocks(clients: Clients, snapshot_id: str) -> tuple[int, int, Iterator[Part]]:
    """(volume size in bytes, block size, the blocks holding data as parts), the listing
    paged with NextToken as the parts are consumed."""
    what = f"list_snapshot_blocks {snapshot_id}"
    first = call(clients.ebs.list_snapshot_blocks, what, SnapshotId=snapshot_id,
                 MaxResults=10000)
    block_size = int(first["BlockSize"])
    volume_size = int(first["VolumeSize"]) << 30

    def parts() -> Iterator[Part]:
        page = first
        while True:
            for block in page.get("Blocks", []):
                index = int(block["BlockIndex"])
                yield Part(offset=index * block_size, length=block_size,
                           key=(index, block["BlockToken"]))
            token = page.get("NextToken")
            if not token:
                return
            page = call(clients.ebs.list_snapshot_blocks, what, SnapshotId=snapshot_id,
                        MaxResults=10000, NextToken=token)

    return volume_size, block_size, parts()


def block_reader(clients: Clients, snapshot_id: str) -> Callable[[Part], bytes]:
    """Fetch one block, its SHA-256 checked against the checksum AWS sends with it."""

    def fetch(part: Part) -> bytes:
        index, token = part.key
        what = f"snapshot {snapshot_id} block {index}"
        try:
            answer = clients.ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index,
                                                    BlockToken=token)
            data: bytes = answer["BlockData"].read()
        except Exception as exc:  # noqa: BLE001 - mapped: Transient is retried per block
            raise map_error(exc, what) from None
        algorithm = (answer.get("ChecksumAlgorithm") or "").upper()
        if algorithm == "SHA256":
            actual = base64.b64encode(hashlib.sha256(data).digest()).decode()
            if actual != answer.get("Checksum"):
                raise VerificationError(f"{what}: SHA-256 {actual} does not match the "
                                        f"checksum AWS sent ({answer.get('Checksum')})")
        elif algorithm:
            raise ProviderError(f"{what}: unknown checksum algorithm {algorithm}")
        return data

    return fetch


def read_snapshot(clients: Clients, snapshot_id: str, target: Path, reading: Reading) -> (
        RangedFile):
    volume_size, block_size, parts = _snapshot_blocks(clients, snapshot_id)
    log.info("snapshot %s: %d GiB volume, blocks of %d bytes", snapshot_id, volume_size >> 30,
             block_size)
    result = read_ranges(target, size=volume_size, parts=parts,
                         fetch=block_reader(clients, snapshot_id),
                         concurrency=reading.part_concurrency, retries=reading.retries,
                         progress=reading.progress, what=f"snapshot {snapshot_id}",
                         stop=reading.stop, budget=reading.budget,
                         source=f"ebs-snapshot:{snapshot_id}")
    log.info("snapshot %s: %d bytes of data read into %s (%d block reads retried, %d bytes "
             "from an earlier attempt)", snapshot_id, result.fetched, target.name,
             result.retried, result.resumed)
    return result


def fetch_ebs(clients: Clients, vm: VMInfo, reading: Reading, *, options: ExportOptions,
              restore: Callable[[], None], job: str | None, written: list[Path],
              snapshots: dict[str, str] | None = None) -> list[FetchedDisk]:
    """The volumes read from `snapshots` (an earlier attempt's), or from new ones."""
    snapshots = snapshots or create_snapshots(clients, vm, job)
    restore()  # the point in time is taken: the instance may run again
    failure: BaseException | None = None
    try:
        wait_snapshots(clients, list(snapshots.values()))
        missing = [d.datastore for d in vm.disks if d.datastore not in snapshots]
        if missing:
            raise ProviderError(f"{vm.identifier}: no snapshot of volume(s) {missing}")

        def fetch(index_disk: tuple[int, Any]) -> FetchedDisk:
            index, disk = index_disk
            target = reading.dest / f"{vm.name}-disk{index + 1}.raw"
            written.append(target)
            result = read_snapshot(clients, snapshots[disk.datastore], target, reading)
            return FetchedDisk(main=result, create_type=RAW)

        return map_in_context(fetch, list(enumerate(vm.disks)),
                              workers=reading.disk_concurrency, stop=reading.stop)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if not kept("snapshots", list(snapshots.values()), options=options, failure=failure):
            delete_snapshots(clients, list(snapshots.values()))


# ---- export task ------------------------------------------------------------------------


def export_prefix(job: str | None) -> str:
    return f"hypersdk/{job or 'adhoc'}/"


def start_export_task(clients: Clients, vm: VMInfo, bucket: str, job: str | None) -> dict[
        str, Any]:
    answer = call(
        clients.ec2.create_instance_export_task, f"create_instance_export_task {vm.identifier}",
        InstanceId=vm.identifier, TargetEnvironment="vmware",
        Description=f"hypersdk export of {vm.identifier}",
        ExportToS3Task={"ContainerFormat": "ova", "DiskImageFormat": "VMDK",
                        "S3Bucket": bucket, "S3Prefix": export_prefix(job)},
        TagSpecifications=[{"ResourceType": "export-instance-task",
                            "Tags": _tags(job, vm.identifier)}])
    task: dict[str, Any] = answer["ExportTask"]
    log.info("%s: export task %s into s3://%s/%s", vm.identifier, task["ExportTaskId"], bucket,
             task.get("ExportToS3Task", {}).get("S3Key", export_prefix(job)))
    return task


def wait_export_task(clients: Clients, task_id: str, *, timeout: float = 12 * 3600,
                     interval: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        tasks = call(clients.ec2.describe_export_tasks, f"export task {task_id}",
                     ExportTaskIds=[task_id])["ExportTasks"]
        if not tasks:
            raise ProviderError(f"export task {task_id} disappeared")
        task: dict[str, Any] = tasks[0]
        state = task["State"]
        if state != last:
            log.info("export task %s: %s %s", task_id, state, task.get("StatusMessage", ""))
            last = state
        if state == "completed":
            return task
        if state in ("cancelled", "cancelling"):
            raise ProviderError(f"export task {task_id} was cancelled: "
                                f"{task.get('StatusMessage') or 'no reason given'}")
        if time.monotonic() > deadline:
            raise ProviderError(f"export task {task_id} not done after {timeout:.0f} s")
        time.sleep(interval)


def object_reader(clients: Clients, bucket: str, key: str) -> Callable[[int, int], bytes]:
    def fetch(offset: int, length: int) -> bytes:
        what = f"s3://{bucket}/{key} bytes {offset}-"
        try:
            answer = clients.s3.get_object(Bucket=bucket, Key=key,
                                           Range=f"bytes={offset}-{offset + length - 1}")
            data: bytes = answer["Body"].read()
        except Exception as exc:  # noqa: BLE001 - mapped: Transient is retried per part
            raise map_error(exc, what) from None
        return data

    return fetch


def read_export(clients: Clients, bucket: str, key: str, target: Path, reading: Reading) -> (
        RangedFile):
    head = call(clients.s3.head_object, f"s3://{bucket}/{key}", Bucket=bucket, Key=key)
    return read_object(target, size=int(head["ContentLength"]),
                       fetch_range=object_reader(clients, bucket, key), reading=reading,
                       what=f"s3://{bucket}/{key}",
                       source=f"s3://{bucket}/{key}#{head.get('ETag', '')}")


def _unpack_ova(ova: Path, vm: VMInfo) -> FetchedDisk:
    """The VMDK inside VM Export's OVA, as the instance's disk (checked to be one)."""
    with tarfile.open(ova) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".vmdk")]
        if len(members) != 1 or "/" in members[0].name or members[0].name.startswith("."):
            raise ProviderError(f"{ova.name}: expected one VMDK in the export, found "
                                f"{[m.name for m in members]}")
        target = ova.with_name(f"{vm.name}-disk1.vmdk")
        source = archive.extractfile(members[0])
        if source is None:
            raise ProviderError(f"{ova.name}: {members[0].name} cannot be read")
        hasher = hashlib.sha256()
        with target.open("wb") as out:
            while chunk := source.read(8 << 20):
                out.write(chunk)
                hasher.update(chunk)
    ova.unlink()
    info = parse_vmdk(target, check_extents=False)
    return FetchedDisk(main=Hashed(path=target, size=target.stat().st_size,
                                   sha256=hasher.hexdigest()),
                       create_type=info.create_type)


def earlier_export(clients: Clients, bucket: str, job: str | None) -> str | None:
    """The OVA a finished export task of this job left for its retry (an object appears
    whole, once the task completed), if any."""
    if not job:
        return None
    listing = call(clients.s3.list_objects_v2, f"s3://{bucket}", Bucket=bucket,
                   Prefix=export_prefix(job))
    found = [item["Key"] for item in listing.get("Contents", [])
             if item["Key"].endswith(".ova")]
    if found:
        log.info("the export object an earlier attempt made is used again: s3://%s/%s",
                 bucket, found[0])
    return found[0] if found else None


def fetch_export_task(clients: Clients, vm: VMInfo, reading: Reading, *, bucket: str,
                      options: ExportOptions, restore: Callable[[], None], job: str | None,
                      written: list[Path], key: str | None = None) -> list[FetchedDisk]:
    """The instance exported by a VM Export task and read from S3, or read from `key`
    (the object of an earlier attempt's task)."""
    task_id = None
    if key is None:
        task = start_export_task(clients, vm, bucket, job)
        task_id = task["ExportTaskId"]
        key = (task.get("ExportToS3Task", {}).get("S3Key")
               or f"{export_prefix(job)}{task_id}.ova")
    done = task_id is None
    failure: BaseException | None = None
    try:
        if task_id is not None:
            task = wait_export_task(clients, task_id)
            done = True
            key = task.get("ExportToS3Task", {}).get("S3Key") or key
        restore()
        ova = reading.dest / f"{vm.name}-export.ova"
        written.append(ova)
        read_export(clients, bucket, key, ova, reading)
        disk = _unpack_ova(ova, vm)
        written.append(disk.main.path)
        return [disk]
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if not done:
            with contextlib.suppress(Exception):
                clients.ec2.cancel_export_task(ExportTaskId=task_id)
        if not kept("export object", [f"s3://{bucket}/{key}"] if done else [],
                    options=options, failure=failure):
            with contextlib.suppress(Exception):
                clients.s3.delete_object(Bucket=bucket, Key=key)
                log.info("export object s3://%s/%s deleted", bucket, key)


# ---- the export -------------------------------------------------------------------------


def export_instance(clients: Clients, vm: VMInfo, reading: Reading, *, method: str,
                    options: ExportOptions, bucket: str | None, job: str | None) -> tuple[
        VMInfo, list[ExportedFile]]:
    """Export one instance under `reading.dest`; on failure nothing it wrote is left."""

    def fetch(written: list[Path]) -> list[FetchedDisk]:
        # what an earlier attempt captured is used again, with no second power cycle
        if transport_of(options) == "export-task" and bucket:
            key = earlier_export(clients, bucket, job)
            if key:
                return fetch_export_task(clients, vm, reading, bucket=bucket,
                                         options=options, restore=lambda: None, job=job,
                                         written=written, key=key)
        else:
            snapshots = earlier_snapshots(clients, vm, job)
            if snapshots:
                return fetch_ebs(clients, vm, reading, options=options, restore=lambda: None,
                                 job=job, written=written, snapshots=snapshots)
        with power_for_export(
                vm, options,
                stop=lambda: stop_instance(clients, vm.identifier, options.shutdown_timeout),
                start=lambda: start_instance(clients, vm.identifier)) as restore:
            if transport_of(options) == "export-task" and bucket:
                return fetch_export_task(clients, vm, reading, bucket=bucket,
                                         options=options, restore=restore, job=job,
                                         written=written)
            return fetch_ebs(clients, vm, reading, options=options, restore=restore, job=job,
                             written=written)

    return export_disks(vm, reading.dest, method=method, options=options, fetch=fetch,
                        map_error=map_error)


def discard(clients: Clients, job: str, bucket: str | None) -> list[str]:
    """Remove what the job's exports left in the account (after a cancel or a crash):
    its snapshots, its running export tasks and their S3 objects. Returns what went."""
    removed: list[str] = []
    answer = call(clients.ec2.describe_snapshots, "describe_snapshots", OwnerIds=["self"],
                  Filters=[{"Name": f"tag:{JOB_TAG}", "Values": [job]}])
    snapshot_ids = [s["SnapshotId"] for s in answer.get("Snapshots", [])]
    delete_snapshots(clients, snapshot_ids)
    removed.extend(snapshot_ids)
    if bucket:
        with contextlib.suppress(Exception):
            tasks = clients.ec2.describe_export_tasks(
                Filters=[{"Name": f"tag:{JOB_TAG}", "Values": [job]}])["ExportTasks"]
            for task in tasks:
                if task["State"] == "active":
                    clients.ec2.cancel_export_task(ExportTaskId=task["ExportTaskId"])
                    removed.append(task["ExportTaskId"])
        listing = call(clients.s3.list_objects_v2, f"s3://{bucket}", Bucket=bucket,
                       Prefix=export_prefix(job))
        for item in listing.get("Contents", []):
            clients.s3.delete_object(Bucket=bucket, Key=item["Key"])
            removed.append(f"s3://{bucket}/{item['Key']}")
    return removed
