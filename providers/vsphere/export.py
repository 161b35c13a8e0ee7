"""Exporting a vSphere VM: its disks fetched over NFC (`ExportVm` + `HttpNfcLease`) or
over the datastore HTTP interface, then packaged as bare VMDKs, an OVF or an OVA."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from pyVim.task import WaitForTask
from pyVmomi import vim

from core.errors import InvalidRequest, ProviderError, Unsupported
from core.models import ExportedFile, ExportOptions, PowerState, VMInfo
from hyper2kvm.vmdk import extent_path, parse_vmdk
from providers.packaging import FetchedDisk, File, export_disks
from providers.vsphere.download import HttpSource, download
from providers.vsphere.session import Session, map_fault, split_host, tls_context

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
T = TypeVar("T")


@dataclass
class Transfer:
    """What every download of one export shares."""

    source: HttpSource
    chunk_size: int
    retries: int
    disk_concurrency: int
    progress: Progress | None
    written: list[Path]  # finished files, removed again if the export fails

    def fetch(self, url: str, target: Path) -> File:
        if target.exists() or target in self.written:
            raise ProviderError(f"two files of the VM are named {target.name}")
        self.written.append(target)
        return download(self.source, url, target, chunk_size=self.chunk_size,
                        retries=self.retries, progress=self.progress)


def http_source(session: Session) -> HttpSource:
    """The server's file interfaces, reached with the SOAP session's cookie."""
    return HttpSource(context=tls_context(session.config),
                      headers={"Cookie": session.cookie.split(";")[0]})


# ---- power ------------------------------------------------------------------------------


def _power_state(vm: Any) -> PowerState:
    return PowerState(str(vm.runtime.powerState))


def power_off(session: Session, vm: Any, timeout: float) -> None:
    """Shut the guest down cleanly (VMware Tools), or power it off after `timeout`."""
    if _power_state(vm) == PowerState.POWERED_ON:
        try:
            vm.ShutdownGuest()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if _power_state(vm) == PowerState.POWERED_OFF:
                    log.info("%s: guest shut down", vm.name)
                    return
                time.sleep(1)
            log.warning("%s: guest did not shut down in %.0f s, powering off", vm.name, timeout)
        except (vim.fault.ToolsUnavailable, vim.fault.InvalidState) as exc:
            log.warning("%s: no guest shutdown (%s), powering off", vm.name,
                        type(exc).__name__)
    if _power_state(vm) != PowerState.POWERED_OFF:
        session.call(lambda: WaitForTask(vm.PowerOffVM_Task()), f"power off {vm.name}")


def restore_power(session: Session, vm: Any, state: PowerState) -> None:
    if state == PowerState.POWERED_ON and _power_state(vm) != PowerState.POWERED_ON:
        session.call(lambda: WaitForTask(vm.PowerOnVM_Task()), f"power on {vm.name}")


# ---- transports -------------------------------------------------------------------------


def datastore_path(file: str) -> tuple[str, str]:
    """'[LocalDS_0] web/web.vmdk' → ('LocalDS_0', 'web/web.vmdk')."""
    if not file.startswith("[") or "]" not in file:
        raise ProviderError(f"not a datastore path: {file!r}")
    return file[1:file.index("]")], file[file.index("]") + 1:].strip()


def folder_url(session: Session, datacenter: str, datastore: str, path: str) -> str:
    host, port = split_host(session.config.host)
    return (f"https://{host}:{port}/folder/{quote(path)}?dcPath={quote(datacenter)}"
            f"&dsName={quote(datastore)}")


def fetch_datastore(session: Session, vm: VMInfo, dest: Path, transfer: Transfer) -> list[
        FetchedDisk]:
    """Every disk's files from the datastore HTTP interface, disks in parallel: the
    backing file, and when that is a text descriptor, the extents it names."""
    if not vm.datacenter:
        raise ProviderError(f"{vm.name}: its datacenter is unknown")
    datacenter = vm.datacenter

    def fetch_disk(file: str) -> FetchedDisk:
        datastore, path = datastore_path(file)
        folder = path.rpartition("/")[0]
        main = transfer.fetch(folder_url(session, datacenter, datastore, path),
                              dest / Path(path).name)
        info = parse_vmdk(main.path, check_extents=False)
        extents = []
        if info.header is None:  # a descriptor: its data is in extent files beside it
            for extent in info.extents:
                if extent.kind == "ZERO":
                    continue
                local = extent_path(main.path, extent)  # refuses '..' and absolute names
                remote = f"{folder}/{extent.file}" if folder else str(extent.file)
                extents.append(transfer.fetch(
                    folder_url(session, datacenter, datastore, remote), local))
        return FetchedDisk(main=main, create_type=info.create_type, extents=extents)

    files = [disk.file for disk in vm.disks]
    if any(not f for f in files):
        raise ProviderError(f"{vm.name}: a disk has no backing file")
    with ThreadPoolExecutor(max_workers=transfer.disk_concurrency) as pool:
        return list(pool.map(fetch_disk, [str(f) for f in files]))


@contextlib.contextmanager
def nfc_lease(session: Session, vm: Any) -> Iterator[Any]:
    """An export lease: ready when yielded; completed if the body succeeds, aborted if
    it fails."""
    lease = session.call(vm.ExportVm, f"ExportVm {vm.name}")
    deadline = time.monotonic() + 300
    while lease.state == vim.HttpNfcLease.State.initializing:
        if time.monotonic() > deadline:
            raise ProviderError(f"{vm.name}: export lease not ready after 300 s")
        time.sleep(0.5)
    if lease.state == vim.HttpNfcLease.State.error:
        raise ProviderError(f"{vm.name}: export lease failed: {lease.error.msg}")
    try:
        yield lease
    except BaseException:
        with contextlib.suppress(Exception):
            lease.HttpNfcLeaseAbort()
        raise
    lease.HttpNfcLeaseComplete()


class LeaseKeeper(threading.Thread):
    """Reports progress to the lease every few seconds; a lease without it times out."""

    def __init__(self, lease: Any, total: int, interval: float = 5.0) -> None:
        super().__init__(name="nfc-lease-keeper", daemon=True)
        self.lease, self.total, self.interval = lease, max(total, 1), interval
        self.done = 0
        self._stop = threading.Event()

    def advance(self, count: int) -> None:
        self.done += count

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.lease.HttpNfcLeaseProgress(min(99, self.done * 100 // self.total))

    def stop(self) -> None:
        self._stop.set()


def lease_disk_urls(session: Session, lease: Any, info: VMInfo) -> list[tuple[str, Any]]:
    """Each disk's URL in the lease (the server's '*' host — "the host you reached me on" —
    rewritten to the one we reach it at), beside the lease's entry for it."""
    host, port = split_host(session.config.host)
    devices = [u for u in lease.info.deviceUrl if u.disk]
    if len(devices) != len(info.disks):
        raise ProviderError(f"{info.name}: the lease offers {len(devices)} disk(s), the VM "
                            f"has {len(info.disks)}")
    urls = []
    for device in devices:
        parts = urlsplit(device.url)
        netloc = f"{host}:{port}" if parts.hostname == "*" else parts.netloc
        urls.append((parts._replace(netloc=netloc).geturl(), device))
    return urls


@contextlib.contextmanager
def kept_alive(lease: Any, info: VMInfo, progress: Progress | None) -> Iterator[Progress]:
    """The lease told how far the disks are every few seconds while the body runs; yields
    the progress callback that counts for the lease too."""
    keeper = LeaseKeeper(lease, sum(d.capacity_bytes for d in info.disks))

    def counted(count: int) -> None:
        keeper.advance(count)
        if progress:
            progress(count)

    keeper.start()
    try:
        yield counted
    finally:
        keeper.stop()


def fetch_nfc(session: Session, vm: Any, info: VMInfo, dest: Path, transfer: Transfer) -> list[
        FetchedDisk]:
    """Every disk through an NFC export lease (the vCenter way: one stream-optimized VMDK
    per disk), disks in parallel, the lease kept alive meanwhile."""
    with nfc_lease(session, vm) as lease:
        urls = lease_disk_urls(session, lease, info)
        outer = transfer.progress
        with kept_alive(lease, info, outer) as counted:
            transfer.progress = counted
            try:
                def fetch(item: tuple[str, Any]) -> FetchedDisk:
                    url, device = item
                    target = dest / Path(device.targetId or urlsplit(url).path).name
                    main = transfer.fetch(url, target)
                    return FetchedDisk(main=main, create_type=_create_type(main.path))

                with ThreadPoolExecutor(max_workers=transfer.disk_concurrency) as pool:
                    return list(pool.map(fetch, urls))
            finally:
                transfer.progress = outer


# ---- packaging --------------------------------------------------------------------------


def _create_type(path: Path) -> str:
    return parse_vmdk(path, check_extents=False).create_type


def check_exportable(info: VMInfo, options: ExportOptions) -> None:
    if info.power_state != PowerState.POWERED_OFF and not options.shutdown_vm:
        raise InvalidRequest(
            f"VM {info.name} is {info.power_state}: its disks are in use. Power it off, or "
            "submit with options.shutdown_vm=true (guest shutdown, then power off)")


@contextlib.contextmanager
def powered_off(session: Session, vm: Any, info: VMInfo,
                options: ExportOptions) -> Iterator[None]:
    """The VM off while the body reads its disks (refused if running, unless the options
    allow a shutdown); powered on again afterwards if it was and the options ask."""
    check_exportable(info, options)
    original = info.power_state
    if original != PowerState.POWERED_OFF:
        power_off(session, vm, options.shutdown_timeout)
    try:
        yield
    finally:
        if options.restore_power_state:
            restore_power(session, vm, original)


def by_transport(transport: str, nfc: Callable[[], T], datastore: Callable[[], T]) -> T:
    """`nfc()` or `datastore()` as `transport` asks; `auto`: NFC, falling back to the
    datastore when the server has no ExportVm."""
    if transport == "datastore":
        return datastore()
    try:
        return nfc()
    except Unsupported as exc:
        if transport == "nfc":
            raise
        log.warning("%s; falling back to the datastore transport", exc)
        return datastore()


def export_vm(session: Session, vm: Any, info: VMInfo, dest: Path, *, method: str,
              options: ExportOptions, chunk_size: int, retries: int, disk_concurrency: int,
              progress: Progress | None) -> tuple[VMInfo, list[ExportedFile]]:
    """Export one VM under `dest`; on failure nothing it wrote is left behind."""

    def fetch(written: list[Path]) -> list[FetchedDisk]:
        transfer = Transfer(http_source(session), chunk_size, retries, disk_concurrency,
                            progress, written)
        return by_transport(options.transport,
                            lambda: fetch_nfc(session, vm, info, dest, transfer),
                            lambda: fetch_datastore(session, info, dest, transfer))

    with powered_off(session, vm, info, options):
        return export_disks(info, dest, method=method, options=options, fetch=fetch,
                            map_error=map_fault)
