"""Getting a GCP instance's disks out the way `gcloud compute images export` does: for
each disk an image (`force_create`, so a running instance can be imaged), exported into
the export bucket as qcow2 (or VMDK) by a Cloud Build job running Google's image-export
tool, then the object downloaded with parallel ranged reads and its CRC32C checked.
Images, builds and objects carry the job's id (label, tag, object prefix) and are removed
at the end, on failure, and by `discard` after a cancel or crash (unless
`options.keep_snapshots`); a transient failure leaves images and objects for the task's
retry to use (`providers.retained`)."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import google_crc32c
from google.cloud import compute_v1
from google.cloud.devtools import cloudbuild_v1
from google.protobuf import duration_pb2

from core.config import GCPProviderConfig
from core.errors import AuthFailed, InvalidRequest, NotFound, ProviderError, Transient
from core.models import Blocker, DiskInfo, ExportedFile, ExportOptions, VMInfo
from hyper2kvm.vmdk import parse_vmdk
from providers.gcp.session import Clients, call, map_error
from providers.gcp.tool import export_tool
from providers.objects import Expected, read_object
from providers.packaging import QCOW2, FetchedDisk, export_disks
from providers.power import power_for_export
from providers.ranged import RangedFile, Reading, map_in_context
from providers.retained import kept

log = logging.getLogger(__name__)
JOB_LABEL = "hypersdk-job"
DISK_LABEL = "hypersdk-disk"  # which disk of the VM an image is of (1, 2, ...)
PREFIX = "hypersdk"  # objects go under hypersdk/<job>/ in the export bucket
BUILD_TIMEOUT = 6 * 3600
_BUILD = cloudbuild_v1.Build.Status
_RUNNING_BUILDS = (_BUILD.PENDING, _BUILD.QUEUED, _BUILD.WORKING)


def _label(job: str | None) -> str:
    """A job id as a label value (lower case letters, digits, - and _)."""
    return re.sub(r"[^a-z0-9_-]", "-", (job or "adhoc").lower())[:63]


def local_disk_blockers(vm: VMInfo, options: ExportOptions) -> list[Blocker]:
    """A local SSD cannot be imaged: migrating without it must be asked for."""
    local = [disk.name for disk in vm.disks if disk.local]
    if not local or options.skip_local_disks:
        return []
    return [Blocker(code="local_disk", message=(
        f"{vm.name} has local SSD(s) {', '.join(local)}: Google cannot image a local SSD (its "
        "data is scratch, lost at every stop); copy what matters to a persistent disk, or set "
        "options.skip_local_disks to migrate without them"))]


def without_local_disks(vm: VMInfo, options: ExportOptions) -> VMInfo:
    """The instance as exported: its local SSDs left out (said in the log), or refused."""
    if (blockers := local_disk_blockers(vm, options)):
        raise InvalidRequest(blockers[0].message)
    local = [disk.name for disk in vm.disks if disk.local]
    if local:
        log.warning("%s: local SSD(s) %s not exported (options.skip_local_disks)", vm.name,
                    ", ".join(local))
    return vm.model_copy(update={"disks": [disk for disk in vm.disks if not disk.local]})


def check_exportable(config_bucket: str | None, options: ExportOptions) -> None:
    if options.transport != "auto":
        raise InvalidRequest(f"options.transport {options.transport!r}: GCP disks leave as "
                             "image exports only; leave transport at auto")
    if not config_bucket:
        raise InvalidRequest("providers.gcp.export_bucket is not set: GCP exports images "
                             "into a Cloud Storage bucket, name one")


# ---- power ------------------------------------------------------------------------------


def _power_calls(clients: Clients, vm: VMInfo) -> dict[str, Callable[[], None]]:
    zone, name = vm.identifier.split("/")

    def stop() -> None:
        operation = call(lambda: clients.instances.stop(project=clients.project, zone=zone,
                                                        instance=name), f"stop {name}")
        clients.wait(operation, f"stop {name}")
        log.info("%s: stopped", vm.identifier)

    def start() -> None:
        operation = call(lambda: clients.instances.start(project=clients.project, zone=zone,
                                                         instance=name), f"start {name}")
        clients.wait(operation, f"start {name}")
        log.info("%s: started again", vm.identifier)

    return {"stop": stop, "start": start}


# ---- images -----------------------------------------------------------------------------


def create_image(clients: Clients, vm: VMInfo, index: int, disk: DiskInfo,
                 job: str | None) -> str:
    """An image of the disk (forced: the instance may be running); its name."""
    stem = re.sub(r"[^a-z0-9-]", "-", vm.name.lower())[:30].strip("-") or "vm"
    name = f"hypersdk-{stem}-d{index + 1}-{int(time.time() * 1000) % 10**10}"
    image = compute_v1.Image(name=name, source_disk=disk.datastore,
                             labels={JOB_LABEL: _label(job), DISK_LABEL: str(index + 1)},
                             description=f"hypersdk export of {vm.identifier}")
    request = compute_v1.InsertImageRequest(project=clients.project, image_resource=image,
                                            force_create=True)
    operation = call(lambda: clients.images.insert(request=request), f"image of {disk.name}")
    clients.wait(operation, f"image of {disk.name}")
    log.info("image %s of disk %s created", name, disk.name)
    return name


def earlier_images(clients: Clients, vm: VMInfo, job: str | None) -> list[str]:
    """The images an earlier attempt of this job made of every disk and left for its
    retry, in the disks' order; empty unless every disk has one that is READY."""
    if not job:
        return []
    images = call(lambda: list(clients.images.list(request=compute_v1.ListImagesRequest(
        project=clients.project, filter=f"labels.{JOB_LABEL}={_label(job)}"))), "GCP images")
    by_disk = {image.labels.get(DISK_LABEL): image.name for image in images
               if image.status == "READY"}
    found = [by_disk.get(str(index + 1)) for index in range(len(vm.disks))]
    if not all(found):
        return []
    log.info("%s: the images an earlier attempt made are used again: %s", vm.name,
             ", ".join(str(name) for name in found))
    return [str(name) for name in found]


def delete_image(clients: Clients, name: str) -> None:
    """Failures are logged; `discard` finds the image again by its label."""
    try:
        operation = clients.images.delete(project=clients.project, image=name)
        clients.wait(operation, f"delete image {name}")
        log.info("image %s deleted", name)
    except Exception as exc:  # noqa: BLE001 - logged
        log.warning("image %s not deleted: %s", name, map_error(exc, "delete"))


# ---- the export build -------------------------------------------------------------------


def worker_args(config: GCPProviderConfig) -> list[str]:
    """Where the export tool's worker VM runs and as whom, as configured."""
    given = {"network": config.export_network, "subnet": config.export_subnet,
             "zone": config.export_zone,
             "compute_service_account": config.export_service_account}
    return [f"-{flag}={value}" for flag, value in given.items() if value]


def network_blockers(clients: Clients) -> list[Blocker]:
    """The export tool's worker VM needs its network: the configured one, else the
    project's "default", which many projects have deleted."""
    network = clients.config.export_network or "default"
    try:
        clients.networks.get(project=clients.project, network=network)
    except Exception as exc:  # noqa: BLE001 - mapped
        error = map_error(exc, f"GCP network {network}")
        if isinstance(error, AuthFailed):  # may not look: the build will tell
            log.warning("network %s of the export tool not checked: %s", network, error)
            return []
        if not isinstance(error, NotFound):
            raise error from None
        fix = ("set providers.gcp.export_network (and export_subnet on a custom-mode "
               "network) to one the worker VM may use"
               if clients.config.export_network is None else
               "name an existing network in providers.gcp.export_network")
        return [Blocker(code="export_network_missing", message=(
            f"GCP's image export tool starts a worker VM on network {network!r}, which "
            f"project {clients.project} does not have: {fix}"))]
    return []


# what making an image of a disk asks of the disk (Compute's testIamPermissions answers,
# per disk, which of them the caller has: nothing is made)
DISK_PERMISSIONS = ["compute.disks.get", "compute.disks.useReadOnly"]


def _imaged_disks(vm: VMInfo) -> list[tuple[str, str]]:
    """(zone, disk name) of each disk an export makes an image of (local SSDs have none)."""
    zone = vm.identifier.split("/")[0]
    return [(zone, disk.datastore.rsplit("/", 1)[-1]) for disk in vm.disks
            if disk.datastore and not disk.local]


def permission_blockers(clients: Clients, vm: VMInfo) -> list[Blocker]:
    """Each disk the caller may not image, asked with testIamPermissions."""
    blockers = []
    for zone, name in _imaged_disks(vm):
        granted = call(partial(
            clients.disks.test_iam_permissions, project=clients.project, zone=zone,
            resource=name, test_permissions_request_resource=compute_v1.TestPermissionsRequest(
                permissions=DISK_PERMISSIONS)), f"GCP disk {name}: testIamPermissions")
        missing = sorted(set(DISK_PERMISSIONS) - set(granted.permissions))
        if missing:
            blockers.append(Blocker(code="permission_denied", message=(
                f"GCP does not grant {', '.join(missing)} on disk {name} to these "
                "credentials: an image of it cannot be made (grant roles/compute.storageAdmin "
                "or a role with those permissions)")))
    return blockers


def csek_blockers(clients: Clients, vm: VMInfo) -> list[Blocker]:
    """Disks encrypted with a customer-supplied key: Compute makes an image of one only
    when handed the key, which hypersdk does not take."""
    blockers = []
    for zone, name in _imaged_disks(vm):
        described = call(partial(clients.disks.get, project=clients.project, zone=zone,
                                 disk=name), f"GCP disk {name}")
        key = described.disk_encryption_key
        if key and (key.sha256 or key.rsa_encrypted_key):
            blockers.append(Blocker(code="disk_encrypted_csek", message=(
                f"GCP disk {name} is encrypted with a customer-supplied key (CSEK): no image "
                "of it can be made without that key, and hypersdk does not take keys; copy it "
                "to a disk with a Google-managed or Cloud KMS key (gcloud compute disks "
                "create NEW --source-disk "
                f"{name} --csek-key-file KEYS) and migrate the copy")))
    return blockers


def start_build(clients: Clients, image: str, uri: str, fmt: str, job: str | None, *,
                tool: str) -> str:
    """A Cloud Build job running the image-export tool (`tool`: its builder image), as
    gcloud starts it; its id."""
    build = cloudbuild_v1.Build(
        steps=[cloudbuild_v1.BuildStep(name=tool, args=[
            f"-timeout={BUILD_TIMEOUT - 60}s",
            f"-source_image=projects/{clients.project}/global/images/{image}",
            f"-destination_uri={uri}", f"-format={fmt}", "-client_id=api",
            *worker_args(clients.config)])],
        timeout=duration_pb2.Duration(seconds=BUILD_TIMEOUT),
        tags=["gce-daisy", "gce-daisy-image-export", "hypersdk", f"hypersdk-{_label(job)}"])
    operation = call(lambda: clients.builds.create_build(project_id=clients.project,
                                                         build=build), f"export of {image}")
    build_id = str(operation.metadata.build.id)
    log.info("image %s: export build %s started, writing %s", image, build_id, uri)
    return build_id


def wait_build(clients: Clients, build_id: str, what: str, *,
               timeout: float = BUILD_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while True:
        build = call(lambda: clients.builds.get_build(project_id=clients.project, id=build_id),
                     f"{what}: build {build_id}")
        if build.status != status:
            status = build.status
            log.info("%s: export build %s %s", what, build_id, status.name)
        if status == _BUILD.SUCCESS:
            return
        if status not in _RUNNING_BUILDS:
            detail = f": {build.status_detail}" if build.status_detail else ""
            raise ProviderError(f"{what}: export build {build_id} ended {status.name}{detail}"
                                f" (logs: {build.log_url or 'Cloud Build history'})")
        if time.monotonic() > deadline:
            raise Transient(f"{what}: export build {build_id} not done after {timeout:.0f} s")
        time.sleep(2)


def cancel_build(clients: Clients, build_id: str) -> None:
    with contextlib.suppress(Exception):
        clients.builds.cancel_build(project_id=clients.project, id=build_id)
        log.info("export build %s cancelled", build_id)


# ---- the object -------------------------------------------------------------------------


def read_exported(clients: Clients, bucket: str, name: str, target: Path,
                  reading: Reading) -> RangedFile:
    what = f"gs://{bucket}/{name}"
    described = call(lambda: clients.storage.bucket(bucket).get_blob(name), what)
    if described is None:
        raise ProviderError(f"{what}: the export build reported success but wrote nothing")
    if described.size is None or not described.crc32c:
        raise ProviderError(f"{what}: the store gave no size or CRC32C")
    # read through the configured endpoint, not the object's mediaLink (which names the
    # store's public host whatever endpoint answered)
    blob = clients.storage.bucket(bucket).blob(name)

    def fetch_range(offset: int, length: int) -> bytes:
        try:  # the library's own retries off: the ranged reader retries, within its budget
            data: bytes = blob.download_as_bytes(start=offset, end=offset + length - 1,
                                                 checksum=None, raw_download=True,
                                                 timeout=(20, 120), retry=None)
        except Exception as exc:  # noqa: BLE001 - mapped: Transient is retried per part
            raise map_error(exc, f"{what} bytes {offset}-") from None
        return data

    result = read_object(target, size=int(described.size), fetch_range=fetch_range,
                         reading=reading, what=what,
                         expected=[Expected.from_base64("crc32c", described.crc32c,
                                                        google_crc32c.Checksum())],
                         source=f"{what}#{described.generation}")
    log.info("%s: %d bytes read into %s, CRC32C checked (%d range reads retried)", what,
             result.size, target.name, result.retried)
    return result


def delete_object(clients: Clients, bucket: str, name: str) -> None:
    try:
        clients.storage.bucket(bucket).blob(name).delete()
        log.info("export object gs://%s/%s deleted", bucket, name)
    except Exception as exc:  # noqa: BLE001 - logged; discard finds it by prefix
        log.warning("gs://%s/%s not deleted: %s", bucket, name, map_error(exc, "delete"))


# ---- the export -------------------------------------------------------------------------


def _fetch_disk(clients: Clients, vm: VMInfo, index: int, image: str, bucket: str,
                reading: Reading, options: ExportOptions, job: str | None,
                written: list[Path], tool: str) -> FetchedDisk:
    fmt = clients.config.export_format
    name = f"{PREFIX}/{_label(job)}/{image}.{fmt}"
    build_id = None
    # an earlier attempt's export of this image, if it finished (an object appears whole)
    if call(lambda: clients.storage.bucket(bucket).get_blob(name), f"gs://{bucket}/{name}"):
        log.info("the export object an earlier attempt made is used again: gs://%s/%s",
                 bucket, name)
    else:
        build_id = start_build(clients, image, f"gs://{bucket}/{name}", fmt, job, tool=tool)
    finished = build_id is None
    failure: BaseException | None = None
    try:
        if build_id is not None:
            wait_build(clients, build_id, f"disk {index + 1} of {vm.name}")
            finished = True
        target = reading.dest / f"{vm.name}-disk{index + 1}.{fmt}"
        written.append(target)
        fetched = read_exported(clients, bucket, name, target, reading)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if build_id is not None and not finished:
            cancel_build(clients, build_id)
        if not kept("export object", [f"gs://{bucket}/{name}"] if finished else [],
                    options=options, failure=failure):
            delete_object(clients, bucket, name)
    kind = QCOW2 if fmt == "qcow2" else parse_vmdk(target, check_extents=False).create_type
    return FetchedDisk(main=fetched, create_type=kind)


def fetch_disks(clients: Clients, vm: VMInfo, reading: Reading, *, bucket: str,
                options: ExportOptions, restore: Callable[[], None], job: str | None,
                written: list[Path], earlier: list[str] | None = None) -> list[FetchedDisk]:
    """The disks through images exported to the bucket: `earlier` ones (an earlier
    attempt's), or new."""
    images: list[str] = list(earlier or [])
    failure: BaseException | None = None
    try:
        if not images:
            for index, disk in enumerate(vm.disks):
                images.append(create_image(clients, vm, index, disk, job))
        restore()  # every disk is captured: the instance may run again
        tool = export_tool(clients, vm.identifier.split("/")[0])
        return map_in_context(
            lambda index: _fetch_disk(clients, vm, index, images[index], bucket, reading,
                                      options, job, written, tool),
            list(range(len(vm.disks))), workers=reading.disk_concurrency, stop=reading.stop)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if not kept("images", images, options=options, failure=failure):
            for image in images:
                delete_image(clients, image)


def export_vm(clients: Clients, vm: VMInfo, reading: Reading, *, method: str,
              options: ExportOptions, job: str | None) -> tuple[VMInfo, list[ExportedFile]]:
    """Export one instance under `reading.dest`; on failure nothing it wrote is left."""
    bucket = clients.config.export_bucket
    check_exportable(bucket, options)
    assert bucket is not None
    vm = without_local_disks(vm, options)

    def fetch(written: list[Path]) -> list[FetchedDisk]:
        earlier = earlier_images(clients, vm, job)
        if earlier:  # the point in time was taken: no power cycle again
            return fetch_disks(clients, vm, reading, bucket=bucket, options=options,
                               restore=lambda: None, job=job, written=written,
                               earlier=earlier)
        with power_for_export(vm, options, **_power_calls(clients, vm)) as restore:
            return fetch_disks(clients, vm, reading, bucket=bucket, options=options,
                               restore=restore, job=job, written=written)

    return export_disks(vm, reading.dest, method=method, options=options, fetch=fetch,
                        map_error=map_error)


def discard(clients: Clients, job: str) -> list[str]:
    """What the job's exports left (a cancel, a crash): running export builds cancelled,
    images deleted, objects removed. Returns what went."""
    label = _label(job)
    removed: list[str] = []
    builds = call(lambda: list(clients.builds.list_builds(
        project_id=clients.project, filter=f'tags="hypersdk-{label}"')), "GCP builds")
    for build in builds:
        if build.status in _RUNNING_BUILDS:
            cancel_build(clients, build.id)
            removed.append(f"build {build.id}")
    images = call(lambda: list(clients.images.list(request=compute_v1.ListImagesRequest(
        project=clients.project, filter=f"labels.{JOB_LABEL}={label}"))), "GCP images")
    for image in images:
        delete_image(clients, image.name)
        removed.append(f"image {image.name}")
    bucket = clients.config.export_bucket
    if bucket:
        blobs = call(lambda: list(clients.storage.list_blobs(bucket,
                                                             prefix=f"{PREFIX}/{label}/")),
                     f"gs://{bucket}")
        for blob in blobs:
            delete_object(clients, bucket, blob.name)
            removed.append(f"gs://{bucket}/{blob.name}")
    return removed

