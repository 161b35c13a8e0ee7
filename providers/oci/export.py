"""Getting an OCI instance's boot volume out: a custom image of the instance, exported to
the export bucket as QCOW2 (the work request followed, its percent in the logs), the
object downloaded with parallel ranged GETs and its MD5 checked where Object Storage gives
one; image and object removed at the end, on failure, and by `discard` after a cancel or
crash (unless `options.keep_snapshots`); a transient failure leaves both for the task's
retry to use (`providers.retained`). A custom image holds the boot volume only: an
instance with block volumes is refused unless `options.boot_volume_only`."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import oci

from core.errors import HypersdkError, InvalidRequest, ProviderError, Transient
from core.models import ExportedFile, ExportOptions, VMInfo
from providers.base import job_label
from providers.objects import Expected, read_object
from providers.oci.inventory import all_pages
from providers.oci.session import Clients, call, map_error
from providers.packaging import QCOW2, FetchedDisk, export_disks
from providers.power import power_for_export
from providers.ranged import RangedFile, Reading
from providers.retained import kept

log = logging.getLogger(__name__)
POWER_WAIT = 900  # seconds a STOP or START may take
JOB_TAG = "hypersdk-job"
INSTANCE_TAG = "hypersdk-instance"
PREFIX = "hypersdk"
TIMEOUT = 12 * 3600


def check_exportable(vm: VMInfo, options: ExportOptions, bucket: str | None) -> None:
    if options.transport != "auto":
        raise InvalidRequest(f"options.transport {options.transport!r}: OCI instances leave "
                             "as image exports only; leave transport at auto")
    if not bucket:
        raise InvalidRequest("providers.oci.export_bucket is not set: OCI exports images "
                             "into an Object Storage bucket, name one")
    volumes = [d.name for d in vm.disks[1:]]
    if volumes and not options.boot_volume_only:
        raise InvalidRequest(
            f"{vm.name} has block volumes attached ({', '.join(volumes)}); an OCI custom image "
            "holds the boot volume only. Set options.boot_volume_only to export it without "
            "them")


def _reached(clients: Clients, vm: VMInfo, state: str, wait: float, what: str) -> bool:
    """Whether the instance reaches `state` within `wait` seconds."""
    try:
        oci.wait_until(clients.compute, clients.compute.get_instance(vm.identifier),
                       "lifecycle_state", state, max_wait_seconds=wait)
    except oci.exceptions.MaximumWaitTimeExceeded:
        return False
    except Exception as exc:  # noqa: BLE001 - mapped
        raise map_error(exc, what) from None
    return True


def _power_calls(clients: Clients, vm: VMInfo, options: ExportOptions) -> dict[
        str, Callable[[], None]]:
    def act(name: str, state: str, wait: float) -> bool:
        what = f"{name} {vm.name}"
        call(lambda: clients.compute.instance_action(vm.identifier, name), what)
        if not _reached(clients, vm, state, wait, what):
            return False
        log.info("%s: %s", vm.name, state.lower())
        return True

    def must(name: str, state: str) -> None:
        if not act(name, state, POWER_WAIT):
            raise ProviderError(f"{name} {vm.name}: not {state} after {POWER_WAIT} s")

    def stop() -> None:
        """SOFTSTOP (the OS shuts down), then STOP (power off) once shutdown_timeout has
        passed: OCI itself would wait 15 minutes for an OS that ignores the request."""
        if not act("SOFTSTOP", "STOPPED", max(options.shutdown_timeout, 1)):
            log.warning("%s: not stopped %d s after SOFTSTOP; powering it off (STOP)",
                        vm.name, options.shutdown_timeout)
            must("STOP", "STOPPED")

    return {"stop": stop, "start": lambda: must("START", "RUNNING")}


def create_image(clients: Clients, vm: VMInfo, job: str | None) -> str:
    details = oci.core.models.CreateImageDetails(
        compartment_id=clients.compartment, instance_id=vm.identifier,
        display_name=f"hypersdk-{vm.name}-{int(time.time())}"[:255],
        freeform_tags={JOB_TAG: job_label(job), INSTANCE_TAG: vm.identifier})
    image = call(lambda: clients.compute.create_image(details).data, f"image of {vm.name}")
    _wait_image(clients, image.id, f"image of {vm.name}")
    log.info("image %s of %s created", image.id, vm.name)
    return str(image.id)


def _wait_image(clients: Clients, image_id: str, what: str, *,
                timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = call(lambda: clients.compute.get_image(image_id).data.lifecycle_state, what)
        if state == "AVAILABLE":
            return
        if state not in ("PROVISIONING", "IMPORTING", "EXPORTING"):
            raise ProviderError(f"{what}: image {image_id} is {state}")
        if time.monotonic() > deadline:
            raise Transient(f"{what}: image {image_id} not available after {timeout:.0f} s")
        time.sleep(2)


def delete_image(clients: Clients, image_id: str) -> None:
    try:
        clients.compute.delete_image(image_id)
        log.info("image %s deleted", image_id)
    except Exception as exc:  # noqa: BLE001 - logged; discard finds it by its tag
        log.warning("image %s not deleted: %s", image_id, map_error(exc, "delete"))


def export_image(clients: Clients, image_id: str, namespace: str, bucket: str,
                 name: str) -> None:
    """Export the image as QCOW2 into the bucket and follow the work request."""
    details = oci.core.models.ExportImageViaObjectStorageTupleDetails(
        destination_type="objectStorageTuple", namespace_name=namespace, bucket_name=bucket,
        object_name=name, export_format="QCOW2")
    answer = call(lambda: clients.compute.export_image(image_id, details), f"export {image_id}")
    request_id = answer.headers.get("opc-work-request-id")
    if not request_id:
        raise ProviderError(f"export {image_id}: OCI returned no work request")
    log.info("image %s: export to %s/%s started (work request %s)", image_id, bucket, name,
             request_id)
    deadline = time.monotonic() + TIMEOUT
    percent = -1.0
    while True:
        work = call(lambda: clients.work_requests.get_work_request(request_id).data,
                    f"work request {request_id}")
        if work.percent_complete is not None and work.percent_complete != percent:
            percent = work.percent_complete
            log.info("image %s: export %s, %.0f %%", image_id, work.status, percent)
        if work.status == "SUCCEEDED":
            return
        if work.status in ("FAILED", "CANCELED"):
            raise ProviderError(f"export of image {image_id} {work.status.lower()} "
                                f"(work request {request_id})")
        if time.monotonic() > deadline:
            raise Transient(f"export of image {image_id} not done after {TIMEOUT} s")
        time.sleep(2)


def read_exported(clients: Clients, namespace: str, bucket: str, name: str, target: Path,
                  reading: Reading) -> RangedFile:
    what = f"oci://{bucket}@{namespace}/{name}"
    head = call(lambda: clients.objects.head_object(namespace, bucket, name), what).headers
    size = int(head["content-length"])
    # the CRC32C covers the whole object however it was uploaded; a multipart upload has
    # no Content-MD5, and its opc-multipart-md5 (of the parts' MD5s) cannot be checked
    crc32c = head.get("opc-content-crc32c")
    md5 = head.get("content-md5")

    def fetch_range(offset: int, length: int) -> bytes:
        try:
            answer = clients.objects.get_object(namespace, bucket, name,
                                                range=f"bytes={offset}-{offset + length - 1}")
            data: bytes = answer.data.content
        except Exception as exc:  # noqa: BLE001 - mapped: Transient is retried per part
            raise map_error(exc, f"{what} bytes {offset}-") from None
        return data

    expected = ([Expected.from_base64("crc32c", crc32c, google_crc32c.Checksum())] if crc32c
                else [Expected.from_base64("md5", md5, hashlib.md5())] if md5 else [])
    result = read_object(target, size=size, fetch_range=fetch_range, reading=reading,
                         what=what, expected=expected, source=f"{what}#{head.get('etag', '')}")
    log.info("%s: %d bytes read into %s, %s (%d range reads retried)", what, result.size,
             target.name, f"{expected[0].name.upper()} checked" if expected
             else "no checksum to check", result.retried)
    return result


def delete_object(clients: Clients, namespace: str, bucket: str, name: str) -> None:
    try:
        clients.objects.delete_object(namespace, bucket, name)
        log.info("export object %s/%s deleted", bucket, name)
    except Exception as exc:  # noqa: BLE001 - logged; discard finds it by prefix
        log.warning("%s/%s not deleted: %s", bucket, name, map_error(exc, "delete"))


def earlier_image(clients: Clients, vm: VMInfo, job: str | None) -> str | None:
    """The image of this instance an earlier attempt of this job made and left for its
    retry, if it is available."""
    if not job:
        return None
    images = all_pages(clients.compute.list_images, "OCI images",
                       compartment_id=clients.compartment)
    for image in images:
        if ((image.freeform_tags or {}).get(JOB_TAG) == job_label(job)
                and (image.freeform_tags or {}).get(INSTANCE_TAG) == vm.identifier
                and image.lifecycle_state == "AVAILABLE"):
            log.info("%s: the image an earlier attempt made is used again: %s", vm.name,
                     image.id)
            return str(image.id)
    return None


def _exported(clients: Clients, namespace: str, bucket: str, name: str) -> bool:
    """Whether an earlier attempt's export of the image is in the bucket (an export's
    object appears once the work request succeeded)."""
    try:
        clients.objects.head_object(namespace, bucket, name)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            return False
        raise map_error(exc, f"{bucket}/{name}") from None
    log.info("the export object an earlier attempt made is used again: %s/%s", bucket, name)
    return True


def fetch_boot_volume(clients: Clients, vm: VMInfo, reading: Reading, *, bucket: str,
                      options: ExportOptions, restore: Callable[[], None], job: str | None,
                      written: list[Path], image_id: str | None = None) -> list[FetchedDisk]:
    """The boot volume through an image exported to the bucket: `image_id` (an earlier
    attempt's, its export used again if it is there) or a new one."""
    namespace = clients.namespace()
    earlier = image_id is not None
    image_id = image_id or create_image(clients, vm, job)
    name = f"{PREFIX}/{job_label(job)}/{vm.name}-{image_id[-12:]}.qcow2"
    failure: BaseException | None = None
    try:
        restore()  # the boot volume is captured: the instance may run again
        if not (earlier and _exported(clients, namespace, bucket, name)):
            export_image(clients, image_id, namespace, bucket, name)
        target = reading.dest / f"{vm.name}-disk1.qcow2"
        written.append(target)
        return [FetchedDisk(main=read_exported(clients, namespace, bucket, name, target,
                                               reading), create_type=QCOW2)]
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if not kept("image and export object", [image_id, f"{bucket}/{name}"],
                    options=options, failure=failure):
            delete_object(clients, namespace, bucket, name)
            delete_image(clients, image_id)


def export_vm(clients: Clients, vm: VMInfo, reading: Reading, *, method: str,
              options: ExportOptions, job: str | None) -> tuple[VMInfo, list[ExportedFile]]:
    """Export the instance's boot volume under `reading.dest`; on failure nothing it wrote
    is left."""
    bucket = clients.config.export_bucket
    check_exportable(vm, options, bucket)
    assert bucket is not None
    boot_only = vm.model_copy(update={"disks": vm.disks[:1]})

    def fetch(written: list[Path]) -> list[FetchedDisk]:
        image_id = earlier_image(clients, vm, job)
        if image_id:  # the point in time was taken: no power cycle again
            return fetch_boot_volume(clients, boot_only, reading, bucket=bucket,
                                     options=options, restore=lambda: None, job=job,
                                     written=written, image_id=image_id)
        with power_for_export(vm, options, **_power_calls(clients, vm, options)) as restore:
            return fetch_boot_volume(clients, boot_only, reading, bucket=bucket,
                                     options=options, restore=restore, job=job,
                                     written=written)

    return export_disks(boot_only, reading.dest, method=method, options=options, fetch=fetch,
                        map_error=map_error)


def discard(clients: Clients, job: str, *, export_wait: float = 900.0) -> list[str]:
    """What the job's exports left (a cancel, a crash): its images and objects. An image
    export cannot be cancelled and its image not deleted while it runs: an export still
    running is waited for (up to `export_wait` seconds), then its object goes too."""
    label = job_label(job)
    removed: list[str] = []
    images = all_pages(clients.compute.list_images, "OCI images",
                       compartment_id=clients.compartment)
    for image in images:
        if (image.freeform_tags or {}).get(JOB_TAG) == label:
            if image.lifecycle_state == "EXPORTING":
                log.info("image %s: waiting for its export to end before removing it",
                         image.id)
                try:
                    _wait_image(clients, image.id, f"image {image.id}", timeout=export_wait)
                except HypersdkError as exc:
                    log.warning("image %s not removed: %s", image.id, exc)
                    continue
            delete_image(clients, image.id)
            removed.append(f"image {image.id}")
    bucket = clients.config.export_bucket
    if bucket:
        namespace = clients.namespace()
        listing = call(lambda: clients.objects.list_objects(
            namespace, bucket, prefix=f"{PREFIX}/{label}/").data, f"OCI bucket {bucket}")
        for item in listing.objects:
            delete_object(clients, namespace, bucket, item.name)
            removed.append(f"{bucket}/{item.name}")
    return removed
