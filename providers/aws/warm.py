"""Warm migration from EC2: every round is a snapshot of each volume, tagged with the job
and the round; the precopy reads the first snapshot's blocks, a later round only the
blocks that EBS direct's ListChangedBlocks says differ from the round before.

What the copy holds is told by a tag: a round's snapshots get `hypersdk:copied` once
their blocks are all written, and only then are the round before's deleted. A round that
failed half way leaves its snapshots untagged; the next round removes them and compares
with the last copied round again, so the copy never misses a change."""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.errors import ProviderError, StaleCopy
from core.models import ExportOptions, VMInfo
from hyper2kvm.output import OutputImage
from providers.aws.export import (
    _snapshot_blocks,
    _state,
    _tags,
    block_reader,
    delete_snapshots,
    job_snapshots,
    stop_instance,
    wait_snapshots,
)
from providers.aws.session import Clients, call
from providers.base import WarmRound
from providers.ranged import Part, map_in_context, with_retries

log = logging.getLogger(__name__)
ROUND_TAG = "hypersdk:round"
COPIED_TAG = "hypersdk:copied"

Rounds = dict[int, dict[str, dict[str, str]]]  # round → volume id → snapshot facts


def _job_rounds(clients: Clients, vm: VMInfo, job: str) -> Rounds:
    rounds: Rounds = {}
    for snapshot in job_snapshots(clients, vm, job):
        tags = {t["Key"]: t["Value"] for t in snapshot.get("Tags", [])}
        if ROUND_TAG in tags:
            rounds.setdefault(int(tags[ROUND_TAG]), {})[snapshot["VolumeId"]] = {
                "id": snapshot["SnapshotId"], "copied": tags.get(COPIED_TAG, "")}
    return rounds


def _running(clients: Clients, instance_id: str) -> bool:
    return _state(clients, instance_id) in ("pending", "running")


def _snapshot_round(clients: Clients, vm: VMInfo, job: str, number: int) -> dict[str, str]:
    """A crash-consistent snapshot of every volume, tagged with the round."""
    answer = call(clients.ec2.create_snapshots, f"create_snapshots {vm.identifier}",
                  InstanceSpecification={"InstanceId": vm.identifier,
                                         "ExcludeBootVolume": False},
                  Description=f"hypersdk warm migration of {vm.identifier}, round {number}",
                  TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
                      *_tags(job, vm.identifier), {"Key": ROUND_TAG, "Value": str(number)}]}])
    return {s["VolumeId"]: s["SnapshotId"] for s in answer["Snapshots"]}


def _changed_blocks(clients: Clients, first: str, second: str) -> tuple[int, int, list[Part]]:
    """(volume bytes, block size, the blocks that differ) between two snapshots; a block
    with no second token is no longer in the second snapshot: zeros now."""
    what = f"list_changed_blocks {first} → {second}"
    parts: list[Part] = []
    token: str | None = None
    while True:
        page = call(clients.ebs.list_changed_blocks, what, FirstSnapshotId=first,
                    SecondSnapshotId=second, MaxResults=10000,
                    **({"NextToken": token} if token else {}))
        block_size = int(page["BlockSize"])
        parts += [Part(offset=int(b["BlockIndex"]) * block_size, length=block_size,
                       key=(int(b["BlockIndex"]), b.get("SecondBlockToken")))
                  for b in page.get("ChangedBlocks", [])]
        token = page.get("NextToken")
        if not token:
            return int(page["VolumeSize"]) << 30, block_size, parts


def _copy_blocks(clients: Clients, snapshot: str, parts: list[Part], output: OutputImage, *,
                 concurrency: int, retries: int,
                 progress: Callable[[int], None] | None) -> int:
    fetch = block_reader(clients, snapshot)

    def one(part: Part) -> int:
        length = min(part.length, output.size - part.offset)
        if part.key[1] is None:
            output.zero(part.offset, length)
        else:
            data = with_retries(lambda: fetch(part), retries=retries,
                                what=f"snapshot {snapshot} block {part.key[0]}")
            output.overwrite(part.offset, data[:length])
        if progress:
            progress(length)
        return length

    return sum(map_in_context(one, parts, workers=concurrency))


def warm_round(clients: Clients, vm: VMInfo, outputs: list[OutputImage], *,
               options: ExportOptions, final: bool, job: str, concurrency: int,
               retries: int, progress: Callable[[int], None] | None = None) -> WarmRound:
    rounds = _job_rounds(clients, vm, job)
    copied = [n for n, volumes in rounds.items()
              if all(v["copied"] for v in volumes.values())]
    last = max(copied) if copied else None
    stale = [v["id"] for n, volumes in rounds.items() if n != last for v in volumes.values()]
    delete_snapshots(clients, stale)  # a failed round's, never written whole
    if last is None and any(o.data_extents() for o in outputs):
        raise StaleCopy(f"{vm.identifier}: the copy holds data but no round's "
                            "snapshots are left to compare with")
    stopped = final and options.shutdown_vm and _running(clients, vm.identifier)
    if stopped:
        stop_instance(clients, vm.identifier, options.shutdown_timeout)
    number = (max(rounds) + 1) if rounds else 0
    snapshots = _snapshot_round(clients, vm, job, number)
    wait_snapshots(clients, list(snapshots.values()))
    changed = 0
    for disk, output in zip(vm.disks, outputs, strict=True):
        new = snapshots.get(disk.datastore or "")
        if new is None:
            raise ProviderError(f"{vm.identifier}: no snapshot of volume {disk.datastore}")
        if last is None:
            size, _, blocks = _snapshot_blocks(clients, new)
            parts = list(blocks)
        else:
            size, _, parts = _changed_blocks(clients, rounds[last][disk.datastore or ""]["id"],
                                             new)
        if size != output.size:
            raise ProviderError(f"volume {disk.datastore} is {size} bytes now, the copy "
                                f"{output.size}; a volume resized while copied warm needs "
                                "a new migration")
        changed += _copy_blocks(clients, new, parts, output, concurrency=concurrency,
                                retries=retries, progress=progress)
    call(clients.ec2.create_tags, "create_tags", Resources=list(snapshots.values()),
         Tags=[{"Key": COPIED_TAG, "Value": "true"}])
    previous = [v["id"] for v in rounds.get(last, {}).values()] if last is not None else []
    done = previous + (list(snapshots.values()) if final and not options.keep_snapshots else [])
    delete_snapshots(clients, done)
    log.info("%s: round %d from %s, %d bytes changed", vm.identifier, number,
             ", ".join(snapshots.values()), changed)
    return WarmRound(changed, stopped_source=stopped)
