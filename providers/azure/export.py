"""Getting an Azure VM's managed disks out: for each disk an incremental snapshot
(`create_option=Copy`), read access granted (a SAS URL to its page blob), the page ranges
that hold data read in parallel into a sparse raw file (the blob is a fixed VHD: its
512-byte footer is checked and dropped), access revoked as soon as the disk is read (Azure
lets only 5 snapshots of one disk hold a SAS at a time), and the snapshot deleted at the
end, on failure, and by `discard` after a cancel or crash (unless
`options.keep_snapshots`); a transient failure leaves the snapshots for the task's retry
to use (`providers.retained`)."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from azure.mgmt.compute.models import (
    CreationData,
    GrantAccessData,
    Snapshot,
    SnapshotProperties,
)
from azure.storage.blob import BlobClient

from core.errors import InvalidRequest, ProviderError, VerificationError
from core.models import Blocker, ExportedFile, ExportOptions, VMInfo
from providers.azure.inventory import enum_text, parse_id
from providers.azure.session import Clients, call, map_error
from providers.packaging import RAW, FetchedDisk, export_disks
from providers.power import power_for_export
from providers.ranged import (
    Part,
    RangedFile,
    Reading,
    map_in_context,
    read_ranges,
    with_retries,
)
from providers.retained import kept

log = logging.getLogger(__name__)
JOB_TAG = "hypersdk-job"
FOOTER = 512
SEGMENT = 1 << 30  # page ranges are listed a GiB at a time, as Microsoft advises
MERGE_GAP = 64 << 10  # ranges this close are read as one: fewer requests, a few zeros more
ACCESS_SECONDS = 24 * 3600
SAS_PER_DISK = 5  # snapshots of one disk that may hold a SAS at a time (incremental)


# ---- power ------------------------------------------------------------------------------


def _power_calls(clients: Clients, vm: VMInfo) -> dict[str, Callable[[], None]]:
    """Deallocate and start, for `power_for_export`."""
    group, name = vm.identifier.split("/")
    machines = clients.compute.virtual_machines

    def deallocate() -> None:
        call(lambda: machines.begin_deallocate(group, name).result(), f"deallocate {name}")
        log.info("%s: deallocated", vm.identifier)

    def start() -> None:
        call(lambda: machines.begin_start(group, name).result(), f"start {name}")
        log.info("%s: started again", vm.identifier)

    return {"stop": deallocate, "start": start}


# ---- snapshots --------------------------------------------------------------------------


def create_snapshot(clients: Clients, disk_id: str, location: str, job: str | None) -> str:
    """An incremental snapshot of the managed disk, in the disk's resource group; its id."""
    group, disk = parse_id(disk_id)
    name = f"{disk}-hypersdk-{(job or 'adhoc')[:8]}-{int(time.time())}"[:80]
    body = Snapshot(location=location, tags={JOB_TAG: job or "none"},
                    properties=SnapshotProperties(
                        incremental=True,
                        creation_data=CreationData(create_option="Copy",
                                                   source_resource_id=disk_id)))
    snapshot = call(lambda: clients.compute.snapshots.begin_create_or_update(
        group, name, body).result(), f"snapshot of {disk}")
    log.info("snapshot %s of disk %s created", snapshot.id, disk)
    return str(snapshot.id)


def wait_copied(clients: Clients, snapshot_id: str, *, timeout: float = 24 * 3600,
                interval: float = 2.0) -> None:
    """Until the snapshot is readable: an incremental snapshot of a Premium SSD v2 or
    Ultra disk (or any still copying) is not instant-access; its background copy's
    `completionPercent` reaches 100 and `snapshotAccessState` leaves Pending first."""
    group, name = parse_id(snapshot_id)
    deadline = time.monotonic() + timeout
    said = None
    while True:
        snapshot = call(lambda: clients.compute.snapshots.get(group, name),
                        f"snapshot {name}")
        properties = snapshot.properties
        percent = properties.completion_percent
        state = properties.snapshot_access_state
        if properties.copy_completion_error is not None:
            error = properties.copy_completion_error
            raise ProviderError(f"snapshot {name}: its background copy failed "
                                f"({error.error_code}: {error.error_message})")
        if (percent is None or percent >= 100) and state != "Pending":
            return
        if (percent, state) != said:
            said = (percent, state)
            log.info("snapshot %s: background copy %.0f%% done (%s); access is granted "
                     "once it ends", name, percent or 0, state or "copying")
        if time.monotonic() > deadline:
            raise ProviderError(f"snapshot {name}: background copy not done after "
                                f"{timeout:.0f} s")
        time.sleep(interval)


def earlier_snapshots(clients: Clients, vm: VMInfo, job: str | None) -> list[str]:
    """The snapshots an earlier attempt of this job made of every disk and left for its
    retry, in the disks' order; empty unless every disk has one."""
    if not job:
        return []
    listings: dict[str, list[Any]] = {}  # each resource group listed once
    found: list[str] = []
    for disk in vm.disks:
        group, _ = parse_id(str(disk.datastore))
        if group not in listings:
            listings[group] = call(lambda g=group: list(
                clients.compute.snapshots.list_by_resource_group(g)),
                f"Azure snapshots of {group}")
        mine = [s.id for s in listings[group] if (s.tags or {}).get(JOB_TAG) == job
                and s.properties.provisioning_state == "Succeeded"
                and _source_disk(s) == str(disk.datastore).lower()]
        if not mine:
            return []
        found.append(str(mine[0]))
    log.info("%s: the snapshots an earlier attempt made are used again: %s", vm.name,
             ", ".join(parse_id(s)[1] for s in found))
    return found


def _source_disk(snapshot: Any) -> str:
    return str(snapshot.properties.creation_data.source_resource_id).lower()


def _holding_sas(clients: Clients, snapshot_id: str) -> list[str]:
    """The other snapshots of the same disk that hold a SAS now (diskState ActiveSAS)."""
    group, name = parse_id(snapshot_id)
    try:
        source = _source_disk(clients.compute.snapshots.get(group, name))
        listing: list[Any] = list(clients.compute.snapshots.list_by_resource_group(group))
    except Exception:  # noqa: BLE001 - only to say more in an error already raised
        return []
    return [str(s.name) for s in listing if s.name != name
            and s.properties.disk_state == "ActiveSAS" and _source_disk(s) == source]


def grant_read(clients: Clients, snapshot_id: str) -> str:
    group, name = parse_id(snapshot_id)
    wait_copied(clients, snapshot_id)
    try:
        access = call(lambda: clients.compute.snapshots.begin_grant_access(
            group, name, GrantAccessData(access="Read", duration_in_seconds=ACCESS_SECONDS)
        ).result(), f"read access to {name}")
    except ProviderError as exc:
        holding = _holding_sas(clients, snapshot_id)
        if len(holding) >= SAS_PER_DISK:
            raise ProviderError(
                f"read access to snapshot {name} refused: Azure lets only {SAS_PER_DISK} "
                f"snapshots of one disk hold a SAS at a time, and {', '.join(holding)} "
                "hold one; revoke their access (az snapshot revoke-access) or let the "
                "exports that use them finish") from exc
        raise
    return str(access.access_sas)


def revoke_read(clients: Clients, snapshot_id: str) -> None:
    """Logged if it fails: remove_snapshot (or discard) revokes again."""
    group, name = parse_id(snapshot_id)
    try:
        clients.compute.snapshots.begin_revoke_access(group, name).result()
    except Exception as exc:  # noqa: BLE001 - logged
        log.warning("snapshot %s: access not revoked: %s", name, map_error(exc, "revoke"))


def remove_snapshot(clients: Clients, snapshot_id: str) -> None:
    """Revoke access and delete; failures are logged, the other snapshots still go."""
    group, name = parse_id(snapshot_id)
    snapshots = clients.compute.snapshots
    try:
        snapshots.begin_revoke_access(group, name).result()
        snapshots.begin_delete(group, name).result()
        log.info("snapshot %s deleted", name)
    except Exception as exc:  # noqa: BLE001 - logged; discard() finds it again by tag
        log.warning("snapshot %s not deleted: %s", name, map_error(exc, "delete"))


# ---- the page blob ----------------------------------------------------------------------


def check_footer(footer: bytes, disk_size: int, what: str) -> None:
    """A fixed VHD's footer: 'conectix', disk type 2 (fixed), current size = the data."""
    if len(footer) != FOOTER or footer[:8] != b"conectix":
        raise VerificationError(f"{what}: no VHD footer at the end of the blob")
    current_size, = struct.unpack(">Q", footer[48:56])
    disk_type, = struct.unpack(">I", footer[60:64])
    if disk_type != 2:
        raise VerificationError(f"{what}: VHD disk type {disk_type}, a fixed VHD (2) expected")
    if current_size != disk_size:
        raise VerificationError(f"{what}: the VHD footer says {current_size} bytes, the blob "
                                f"holds {disk_size}")


def page_parts(blob: BlobClient, disk_size: int, reading: Reading, what: str) -> Iterator[
        Part]:
    """The blob's ranges holding data (before the footer), listed a segment at a time
    (one listing of a large, fragmented page blob times out on Azure: 500
    OperationTimedOut), each segment retried on its own; ranges closer than MERGE_GAP are
    read as one, cut into parts of at most the part size."""
    run: tuple[int, int] | None = None
    for segment in range(0, disk_size, SEGMENT):
        length = min(SEGMENT, disk_size - segment)
        listed = with_retries(partial(_data_ranges, blob, segment, length, what),
                              retries=reading.retries, what=f"{what}: page ranges at {segment}",
                              budget=reading.budget, stop=reading.stop)
        for start, end in listed:
            if run is not None and start - run[1] <= MERGE_GAP:
                run = (run[0], max(run[1], end))
                continue
            if run is not None:
                yield from _cut(run, reading.part_size)
            run = (start, end)
    if run is not None:
        yield from _cut(run, reading.part_size)


def _data_ranges(blob: BlobClient, start: int, length: int, what: str) -> list[tuple[int, int]]:
    """[start, end) of each range with data in the segment, clipped to it."""
    try:
        return [(max(page.start or 0, start), min((page.end or 0) + 1, start + length))
                for page in blob.list_page_ranges(offset=start, length=length)
                if not page.cleared]
    except Exception as exc:  # noqa: BLE001 - mapped: Transient is retried per segment
        raise map_error(exc, f"{what}: page ranges") from None


def _cut(run: tuple[int, int], part_size: int) -> Iterator[Part]:
    start, end = run
    for offset in range(start, end, part_size):
        yield Part(offset=offset, length=min(part_size, end - offset))


def range_reader(blob: BlobClient, what: str) -> Callable[[Part], bytes]:
    def fetch(part: Part) -> bytes:
        try:
            data: bytes = blob.download_blob(offset=part.offset, length=part.length).readall()
        except Exception as exc:  # noqa: BLE001 - mapped: Transient is retried per range
            raise map_error(exc, f"{what} bytes {part.offset}-") from None
        return data

    return fetch


def read_snapshot(clients: Clients, sas_url: str, target: Path, reading: Reading,
                  what: str, *, source: str) -> RangedFile:
    # azure-core's own retries off: the ranged reader retries each range with backoff
    blob = BlobClient.from_blob_url(sas_url, retry_total=0, **clients.blob_options())
    size = call(lambda: blob.get_blob_properties().size, f"{what}: properties")
    disk_size = size - FOOTER
    footer = range_reader(blob, what)(Part(offset=disk_size, length=FOOTER))
    check_footer(footer, disk_size, what)
    result = read_ranges(target, size=disk_size,
                         parts=page_parts(blob, disk_size, reading, what),
                         fetch=range_reader(blob, what), concurrency=reading.part_concurrency,
                         retries=reading.retries, progress=reading.progress, what=what,
                         stop=reading.stop, budget=reading.budget, source=source)
    log.info("%s: %d bytes of data read into %s (%d range reads retried)", what,
             result.fetched, target.name, result.retried)
    return result


# ---- the export -------------------------------------------------------------------------


def fetch_disks(clients: Clients, vm: VMInfo, reading: Reading, *, options: ExportOptions,
                restore: Callable[[], None], job: str | None, written: list[Path],
                earlier: list[str] | None = None) -> list[FetchedDisk]:
    """The disks read from snapshots: `earlier` ones (an earlier attempt's), or new."""
    snapshots: list[str] = list(earlier or [])
    failure: BaseException | None = None
    try:
        if not snapshots:
            for disk in vm.disks:
                snapshots.append(create_snapshot(clients, str(disk.datastore),
                                                 vm.datacenter or "", job))
        restore()  # every disk is captured: the VM may run again

        def fetch(index: int) -> FetchedDisk:
            target = reading.dest / f"{vm.name}-disk{index + 1}.raw"
            written.append(target)
            sas = grant_read(clients, snapshots[index])
            what = f"snapshot {parse_id(snapshots[index])[1]}"
            try:
                return FetchedDisk(main=read_snapshot(clients, sas, target, reading, what,
                                                      source=snapshots[index]),
                                   create_type=RAW)
            finally:
                revoke_read(clients, snapshots[index])

        return map_in_context(fetch, list(range(len(vm.disks))),
                              workers=reading.disk_concurrency, stop=reading.stop)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if not kept("snapshots", snapshots, options=options, failure=failure):
            for snapshot_id in snapshots:
                remove_snapshot(clients, snapshot_id)


def export_vm(clients: Clients, vm: VMInfo, reading: Reading, *, method: str,
              options: ExportOptions, job: str | None) -> tuple[VMInfo, list[ExportedFile]]:
    """Export one VM under `reading.dest`; on failure nothing it wrote is left."""

    def fetch(written: list[Path]) -> list[FetchedDisk]:
        earlier = earlier_snapshots(clients, vm, job)
        if earlier:  # the point in time was taken: no power cycle again
            return fetch_disks(clients, vm, reading, options=options, restore=lambda: None,
                               job=job, written=written, earlier=earlier)
        with power_for_export(vm, options, **_power_calls(clients, vm)) as restore:
            return fetch_disks(clients, vm, reading, options=options, restore=restore,
                               job=job, written=written)

    return export_disks(vm, reading.dest, method=method, options=options, fetch=fetch,
                        map_error=map_error)


def discard(clients: Clients, job: str) -> list[str]:
    """Snapshots the job's exports left (a cancel, a crash): access revoked, deleted."""
    groups = clients.config.resource_groups
    snapshots = clients.compute.snapshots
    listing: list[Any] = (
        [s for g in groups for s in call(lambda g=g: list(snapshots.list_by_resource_group(g)),
                                         f"Azure snapshots of {g}")]
        if groups else call(lambda: list(snapshots.list()), "Azure snapshots"))
    found = [s.id for s in listing if (s.tags or {}).get(JOB_TAG) == job]
    for snapshot_id in found:
        remove_snapshot(clients, snapshot_id)
    return found


def access_blockers(clients: Clients, vm: VMInfo) -> list[Blocker]:
    """Managed disks whose bytes cannot leave as we read them, from the disks' own
    settings: encrypted inside the guest (ADE) or as a confidential VM's, or readable only
    through a private endpoint or with an Azure AD token instead of a SAS."""
    blockers = []
    for disk in vm.disks:
        group, name = parse_id(str(disk.datastore))
        properties = call(partial(clients.compute.disks.get, group, name),
                          f"Azure disk {name}").properties
        ade = properties.encryption_settings_collection
        if ade is not None and ade.enabled:
            blockers.append(Blocker(code="disk_encrypted_in_guest", message=(
                f"disk {name} is encrypted inside the guest by Azure Disk Encryption: the "
                "copy would not boot without the key vault's keys; decrypt it in the guest "
                "first (Disable-AzVMDiskEncryption)")))
        security = properties.security_profile
        if security is not None and "Confidential" in enum_text(security.security_type):
            blockers.append(Blocker(code="confidential_disk", message=(
                f"disk {name} belongs to a confidential VM ({security.security_type}): its "
                "guest state is bound to the VM's vTPM and cannot be migrated")))
        if enum_text(properties.network_access_policy) == "DenyAll":
            blockers.append(Blocker(code="disk_access_denied", message=(
                f"disk {name} has networkAccessPolicy DenyAll: no SAS is granted to read its "
                "snapshots; set AllowAll (or AllowPrivate through a disk access this host "
                "reaches) for the migration")))
        if enum_text(properties.data_access_auth_mode) == "AzureActiveDirectory":
            blockers.append(Blocker(code="disk_access_denied", message=(
                f"disk {name} has dataAccessAuthMode AzureActiveDirectory: a SAS alone does "
                "not read it; set dataAccessAuthMode None for the migration")))
    return blockers


def check_exportable(options: ExportOptions) -> None:
    if options.transport not in ("auto",):
        raise InvalidRequest(f"options.transport {options.transport!r}: Azure disks are read "
                            "from snapshots only; leave transport at auto")
