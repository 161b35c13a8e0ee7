"""Warm migration from vSphere with Changed Block Tracking (CBT): every round is a
snapshot; `QueryChangedDiskAreas` against the changeId of the last round copied says which
areas of each disk changed (`*` for the precopy: every area in use), and only those are
read, over the datastore HTTP interface, in ranges of the disk's flat extent.

The changeIds the copy matches are kept beside the copy (`.DISK.cbt.partial`, written
once a round's areas are all in the images): what the copy holds and what it was compared
with stay together, and go together (a cancelled job's partial files are removed). A
round's snapshot is removed once it is read; one left by a failed round is removed by the
next, which compares with the last copied changeIds again."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyVim.task import WaitForTask
from pyVmomi import vim

from core.errors import InvalidRequest, ProviderError, StaleCopy, Transient, Unsupported
from core.files import side_file
from core.models import ExportOptions, VMInfo
from hyper2kvm.output import OutputImage
from providers.base import WarmRound, job_label
from providers.ranged import map_in_context, with_retries
from providers.vsphere.download import status_error
from providers.vsphere.export import http_source, power_off
from providers.vsphere.inventory import retrieve
from providers.vsphere.session import Session
from providers.vsphere.stream import Ranged, datastore_plans

log = logging.getLogger(__name__)
SNAPSHOT_PREFIX = "hypersdk-warm-"
READ = 4 << 20  # bytes per ranged read of a changed area


def snapshot_name(job: str, number: int) -> str:
    return f"{SNAPSHOT_PREFIX}{job_label(job)}-{number}"


def check_tracking(session: Session, vm: Any, options: ExportOptions) -> None:
    """Refuse a VM without CBT, unless the job may turn it on."""
    if vm.config.changeTrackingEnabled or options.enable_cbt:
        return
    raise InvalidRequest(f"VM {vm.name!r} has Changed Block Tracking off, which a warm "
                         "migration needs: turn it on (vSphere: ctkEnabled) or set "
                         "options.enable_cbt to let the job turn it on")


def _tracked(session: Session, vm: Any, options: ExportOptions) -> None:
    check_tracking(session, vm, options)
    if not vm.config.changeTrackingEnabled:
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
        session.call(lambda: WaitForTask(vm.ReconfigVM_Task(spec=spec)),
                     f"enable CBT on {vm.name}")
        log.info("%s: Changed Block Tracking turned on", vm.name)


def job_snapshots(info: Any, job: str) -> list[Any]:
    """The snapshots warm rounds of `job` made and left (a failed round's), from a VM's
    snapshot info."""
    prefix = f"{SNAPSHOT_PREFIX}{job_label(job)}-"
    found: list[Any] = []

    def walk(trees: list[Any]) -> None:
        for tree in trees:
            if tree.name.startswith(prefix):
                found.append(tree.snapshot)
            walk(tree.childSnapshotList)

    walk(info.rootSnapshotList if info else [])
    return found


def snapshot_info(session: Session, vm: Any) -> Any:
    """The VM's snapshot tree, or None (read through the PropertyCollector: a VM without
    snapshots has no `snapshot` property to fetch)."""
    rows = retrieve(session.content, {vim.VirtualMachine: ["snapshot"]}, objects=[vm])
    return rows[0][1].get("snapshot") if rows else None


def remove_snapshots(session: Session, snapshots: list[Any], *,
                     timeout: float = 3600.0) -> None:
    for snapshot in snapshots:
        def remove(target: Any = snapshot) -> Any:
            return target.RemoveSnapshot_Task(removeChildren=False)

        task = session.call(remove, "remove a warm round's snapshot")
        _finished(session, task, "remove a warm round's snapshot", timeout=timeout)


def _finished(session: Session, task: Any, what: str, *, timeout: float) -> None:
    """Until the task succeeded; its error raised. Its state is read alone: a snapshot's
    task names the snapshot as its entity, which is no ManagedEntity to pyVmomi."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = retrieve(session.content, {vim.Task: ["info.state", "info.error"]},
                        objects=[task])
        state = rows[0][1].get("info.state") if rows else None
        if state == "success":
            return
        if state == "error":
            error = rows[0][1].get("info.error")
            raise ProviderError(f"{what}: {getattr(error, 'msg', None) or error}")
        time.sleep(0.2)
    raise ProviderError(f"{what}: not done after {timeout:.0f} s")


def _state_file(outputs: list[OutputImage]) -> Path:
    return side_file(outputs[0].target, "cbt")


def _disk_devices(snapshot: Any, info: VMInfo) -> list[Any]:
    """The snapshot's disk devices, in the order of the VM's disks (by backing file)."""
    by_file = {getattr(d.backing, "fileName", None): d for d in snapshot.config.hardware.device
               if isinstance(d, vim.vm.device.VirtualDisk)}
    missing = [d.file for d in info.disks if d.file not in by_file]
    if missing:
        raise ProviderError(f"{info.name}: the snapshot has no disk {missing[0]}")
    return [by_file[d.file] for d in info.disks]


def _changed_areas(session: Session, vm: Any, snapshot: Any, device: Any,
                   since: str) -> list[tuple[int, int]]:
    areas: list[tuple[int, int]] = []
    offset, capacity = 0, int(device.capacityInKB) * 1024
    while offset < capacity:
        def query(start: int = offset) -> Any:
            return vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=device.key,
                                            startOffset=start, changeId=since)

        answer = session.call(query, f"QueryChangedDiskAreas {vm.name}")
        areas += [(int(a.start), int(a.length)) for a in answer.changedArea or []]
        offset = int(answer.startOffset) + int(answer.length)
        if int(answer.length) <= 0:
            raise ProviderError(f"{vm.name}: QueryChangedDiskAreas answered an empty window")
    return areas


def _copy_areas(session: Session, plan: Ranged, areas: list[tuple[int, int]],
                output: OutputImage, *, retries: int, concurrency: int,
                progress: Callable[[int], None] | None) -> int:
    source = http_source(session)
    reads = [(start, min(READ, end - start)) for area_start, length in areas
             for end in [area_start + length] for start in range(area_start, end, READ)]
    local = threading.local()  # a kept-alive connection per thread: no TLS setup per read
    opened: list[http.client.HTTPConnection] = []

    def fetch(start: int, length: int) -> bytes:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = source.connect(plan.url)
            opened.append(connection)
        try:
            response = source.request(connection, plan.url,
                                      {"Range": f"bytes={start}-{start + length - 1}"})
            data = response.read(length) if response.status == 206 else b""
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            local.connection = None
            raise Transient(f"{plan.url} at {start}: {exc}") from None
        if response.status != 206:
            connection.close()
            local.connection = None
            raise status_error(response.status, plan.url)
        if len(data) != length:
            raise ProviderError(f"{plan.url}: {len(data)} bytes at {start}, not {length}")
        return data

    def one(read: tuple[int, int]) -> int:
        start, length = read
        output.overwrite(start, with_retries(lambda: fetch(start, length), retries=retries,
                                             what=f"{plan.url} at {start}"))
        if progress:
            progress(length)
        return length

    try:
        return sum(map_in_context(one, reads, workers=concurrency))
    finally:
        for connection in opened:
            connection.close()


def warm_round(session: Session, vm: Any, info: VMInfo, outputs: list[OutputImage], *,
               options: ExportOptions, final: bool, job: str, retries: int,
               concurrency: int, progress: Callable[[int], None] | None = None) -> WarmRound:
    _tracked(session, vm, options)
    remove_snapshots(session, job_snapshots(snapshot_info(session, vm), job))  # a failed round's
    state = _state_file(outputs)
    since: dict[str, str] = json.loads(state.read_text()) if state.is_file() else {}
    if not since and any(o.data_extents() for o in outputs):
        raise StaleCopy(f"{info.name}: the copy holds data but what it was compared with "
                            "is gone")
    plans = datastore_plans(session, info, http_source(session))
    if plans is None or not all(isinstance(p, Ranged) for p in plans):
        raise Unsupported(f"{info.name}: a warm migration reads changed areas in ranges; "
                          "its disks must be stored flat (as ESXi stores them)")
    stopped = final and str(vm.runtime.powerState) != "poweredOff"
    if stopped:
        power_off(session, vm, options.shutdown_timeout)
    number = int(since.get("round", "-1")) + 1
    task = vm.CreateSnapshot_Task(name=snapshot_name(job, number),
                                  description="hypersdk warm migration round",
                                  memory=False, quiesce=False)
    session.call(lambda: WaitForTask(task), f"snapshot {vm.name}")
    snapshot = task.info.result
    changed = 0
    reached: dict[str, str] = {"round": str(number)}
    try:
        for device, plan, output in zip(_disk_devices(snapshot, info), plans, outputs,
                                        strict=True):
            if output.size != int(device.capacityInKB) * 1024:
                raise ProviderError(f"{info.name}: disk {device.key} is "
                                    f"{int(device.capacityInKB) * 1024} bytes now, the copy "
                                    f"{output.size}; a disk resized while copied warm needs "
                                    "a new migration")
            areas = _changed_areas(session, vm, snapshot, device,
                                   since.get(str(device.key), "*"))
            changed += _copy_areas(session, plan, areas, output,  # type: ignore[arg-type]
                                   retries=retries, concurrency=concurrency,
                                   progress=progress)
            reached[str(device.key)] = str(device.backing.changeId)
    finally:
        remove_snapshots(session, [snapshot])
    state.write_text(json.dumps(reached))
    log.info("%s: round %d, %d bytes of changed areas read", info.name, number, changed)
    return WarmRound(changed, stopped_source=stopped)
