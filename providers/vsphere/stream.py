"""A vSphere VM's disks streamed straight into output images (the one-pass path): no copy
of a disk lands in the export folder.

* Datastore transport, a disk stored flat (a descriptor naming one FLAT or VMFS extent,
  as ESXi stores disks): the extent answers HTTP ranges, so nbdkit's curl plugin serves it
  as a disk and qemu-img copies it into the output (providers.nbd_source, hyper2kvm.output);
  a cut connection costs one request, retried.
* NFC (`ExportVm` lease), or a disk stored stream-optimized on the datastore: a
  stream-optimized VMDK served without ranges, read once in order and inflated on the way
  (hyper2kvm.vmdk_stream); a cut connection restarts that disk.
* Any other layout (hosted sparse, split extents, snapshots' delta disks): not streamed;
  the job exports and converts in two passes as before.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from core.errors import (
    ConversionError,
    HypersdkError,
    ProviderError,
    Transient,
    VerificationError,
)
from core.models import ExportOptions, VMInfo
from hyper2kvm.output import OutputImage
from hyper2kvm.qemu_img import bytes_progress
from hyper2kvm.vmdk import MAGIC, SECTOR, parse_descriptor, parse_header
from hyper2kvm.vmdk_stream import inflate_stream
from providers.base import BytesProgress, OpenOutput
from providers.nbd_source import HttpsTls, ranged_https_disk
from providers.ranged import map_in_context
from providers.vsphere.download import HttpSource, status_error
from providers.vsphere.export import (
    by_transport,
    datastore_path,
    folder_url,
    http_source,
    kept_alive,
    lease_disk_urls,
    nfc_lease,
    powered_off,
)
from providers.vsphere.session import Session, map_fault

log = logging.getLogger(__name__)
_PROBE = 64 << 10  # enough of a disk's backing file to tell a descriptor from a sparse header


@dataclass(frozen=True)
class Ranged:
    """A disk whose bytes are one file that answers ranges (a flat extent)."""

    url: str


@dataclass(frozen=True)
class Stream:
    """A disk served as a stream-optimized VMDK, read in order."""

    url: str


Plan = Ranged | Stream


@dataclass
class _Counter:
    """Bytes of one disk reported so far: a restarted stream reports nothing twice."""

    progress: BytesProgress | None
    reported: int = 0

    def reach(self, position: int) -> None:
        if position > self.reported:
            if self.progress:
                self.progress(position - self.reported)
            self.reported = position


def _probe(source: HttpSource, url: str) -> bytes:
    connection, response = source.get(url, {"Range": f"bytes=0-{_PROBE - 1}"})
    try:
        if response.status not in (200, 206):
            raise status_error(response.status, url)
        return response.read(_PROBE)
    finally:
        connection.close()


def datastore_plans(session: Session, info: VMInfo, source: HttpSource) -> list[Plan] | None:
    """How each disk streams from the datastore, or None if one cannot."""
    if not info.datacenter:
        raise ProviderError(f"{info.name}: its datacenter is unknown")
    plans: list[Plan] = []
    for disk in info.disks:
        if not disk.file:
            raise ProviderError(f"{info.name}: a disk has no backing file")
        datastore, path = datastore_path(str(disk.file))
        url = folder_url(session, info.datacenter, datastore, path)
        head = _probe(source, url)
        if head[:4] == MAGIC:
            header = parse_header(head)
            if not (header.compressed and header.has_markers):
                log.info("%s: %s is a hosted sparse VMDK; not streamed", info.name, path)
                return None
            plans.append(Stream(url))
            continue
        try:
            described = parse_descriptor(head.decode("utf-8", errors="strict"))
        except (UnicodeDecodeError, HypersdkError) as exc:
            log.info("%s: %s is neither a descriptor nor a sparse VMDK (%s); not streamed",
                     info.name, path, exc)
            return None
        extents = described.extents
        if (len(extents) != 1 or extents[0].kind not in ("FLAT", "VMFS") or extents[0].offset
                or not extents[0].file or "/" in extents[0].file
                or extents[0].sectors * SECTOR != disk.capacity_bytes):
            log.info("%s: %s is laid out as %s; not streamed", info.name, path,
                     described.create_type)
            return None
        folder = path.rpartition("/")[0]
        remote = f"{folder}/{extents[0].file}" if folder else extents[0].file
        plans.append(Ranged(folder_url(session, info.datacenter, datastore, remote)))
    return plans


def _copy_ranged(session: Session, plan: Ranged, output: OutputImage, *, retries: int,
                 progress: BytesProgress | None, stop: threading.Event) -> None:
    config = session.config
    tls = HttpsTls(verify=not (config.insecure or config.thumbprint), ca_file=config.ca_file)
    what = urlsplit(plan.url).path
    with ranged_https_disk(plan.url, cookie=session.cookie.split(";")[0], tls=tls,
                           retries=retries) as disk:
        try:
            output.copy_from(disk.uri, progress=bytes_progress(output.size, progress)
                             if progress else None, stop=stop, what=what)
        except ConversionError as exc:
            if stop.is_set():
                raise
            raise disk.error(what, exc) from None


def _stoppable(response: http.client.HTTPResponse, stop: threading.Event,
               what: str) -> Callable[[int], bytes]:
    def read(count: int) -> bytes:
        if stop.is_set():
            raise Transient(f"{what}: stopped")
        return response.read(count)

    return read


def _copy_stream(source: HttpSource, plan: Stream, output: OutputImage, *, retries: int,
                 progress: BytesProgress | None, stop: threading.Event) -> None:
    """Read the stream to its end into `output`; a broken connection starts the disk over
    (the stream has no ranges), writing the same bytes again."""
    counter = _Counter(progress)
    what = urlsplit(plan.url).path
    failures = 0

    def write(offset: int, data: bytes) -> None:
        output.write(offset, data)
        counter.reach(offset + len(data))

    def check_capacity(capacity: int) -> None:
        if capacity != output.size:
            raise VerificationError(f"{what}: the stream's disk holds {capacity} bytes, the "
                                    f"VM's disk {output.size}")

    while True:
        connection, response = source.get(plan.url, {})
        try:
            if response.status != 200:
                raise status_error(response.status, plan.url)

            inflate_stream(_stoppable(response, stop, what), write, what=what,
                           on_header=check_capacity)
            counter.reach(output.size)
            return
        except (OSError, http.client.HTTPException) as exc:
            failures += 1
            if failures > retries:
                raise Transient(f"{what}: the stream broke {failures} times, last: "
                                f"{exc!r}") from None
            log.warning("%s: the stream broke (%r); reading the disk again from the start",
                        what, exc)
            time.sleep(min(0.2 * 2 ** failures, 5))
        finally:
            connection.close()


def _stream_plans(session: Session, info: VMInfo, plans: list[Plan], open_output: OpenOutput,
                  *, retries: int, disk_concurrency: int,
                  progress: BytesProgress | None) -> None:
    source = http_source(session)
    stop = threading.Event()

    def one(item: tuple[int, Plan]) -> None:
        index, plan = item
        output = open_output(index, info.disks[index].capacity_bytes)
        if isinstance(plan, Ranged):
            _copy_ranged(session, plan, output, retries=retries, progress=progress, stop=stop)
        else:
            _copy_stream(source, plan, output, retries=retries, progress=progress, stop=stop)

    map_in_context(one, list(enumerate(plans)), workers=disk_concurrency, stop=stop)


def _stream_nfc(session: Session, vm: Any, info: VMInfo, open_output: OpenOutput, *,
                retries: int, disk_concurrency: int, progress: BytesProgress | None) -> None:
    with nfc_lease(session, vm) as lease, kept_alive(lease, info, progress) as counted:
        plans: list[Plan] = [Stream(url) for url, _ in lease_disk_urls(session, lease, info)]
        _stream_plans(session, info, plans, open_output, retries=retries,
                      disk_concurrency=disk_concurrency, progress=counted)


def _stream_datastore(session: Session, info: VMInfo, open_output: OpenOutput, *,
                      retries: int, disk_concurrency: int,
                      progress: BytesProgress | None) -> VMInfo | None:
    plans = datastore_plans(session, info, http_source(session))
    if plans is None:
        return None
    _stream_plans(session, info, plans, open_output, retries=retries,
                  disk_concurrency=disk_concurrency, progress=progress)
    return info


def stream_vm(session: Session, vm: Any, info: VMInfo, open_output: OpenOutput, *,
              options: ExportOptions, retries: int, disk_concurrency: int,
              progress: BytesProgress | None) -> VMInfo | None:
    """Every disk of the VM into the output `open_output` gives it; None (nothing opened)
    when a disk's layout cannot be streamed."""
    def nfc() -> VMInfo | None:
        _stream_nfc(session, vm, info, open_output, retries=retries,
                    disk_concurrency=disk_concurrency, progress=progress)
        return info

    def datastore() -> VMInfo | None:
        return _stream_datastore(session, info, open_output, retries=retries,
                                 disk_concurrency=disk_concurrency, progress=progress)

    with powered_off(session, vm, info, options):
        try:
            return by_transport(options.transport, nfc, datastore)
        except Exception as exc:
            if isinstance(exc, HypersdkError):
                raise
            raise map_fault(exc, f"export {info.name}") from exc
