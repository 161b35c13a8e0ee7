"""Waves: the order a submitted list's jobs are created in, from their `after` (the VMs of
other jobs of the list, or ids of jobs already submitted), refused when an entry names
nothing or the entries form a cycle."""

from __future__ import annotations

from uuid import UUID

from core.errors import InvalidRequest
from core.models import JobDefinition


def wave_order(batch: list[JobDefinition]) -> tuple[list[int], dict[int, list[int]]]:
    """(the jobs' creation order, each job's dependencies within the list by index)."""
    by_vm = {job.vm_identifier: index for index, job in enumerate(batch)}
    within: dict[int, list[int]] = {index: [] for index in range(len(batch))}
    for index, job in enumerate(batch):
        for entry in job.after:
            if entry in by_vm:
                within[index].append(by_vm[entry])
                continue
            try:
                UUID(entry)
            except ValueError:
                raise InvalidRequest(
                    f"job {index + 1} ({job.vm_identifier}): after names {entry!r}, which is "
                    "neither a job id nor the VM of another job of this list") from None
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(index: int, path: list[int]) -> None:
        if state.get(index) == "done":
            return
        if state.get(index) == "visiting":
            cycle = path[path.index(index):] + [index]
            raise InvalidRequest("the jobs' after form a cycle: " + " → ".join(
                batch[i].vm_identifier for i in cycle))
        state[index] = "visiting"
        for upstream in within[index]:
            visit(upstream, [*path, index])
        state[index] = "done"
        order.append(index)

    for index in range(len(batch)):
        visit(index, [])
    return order, within


def external_ids(job: JobDefinition, batch: list[JobDefinition]) -> list[str]:
    """The entries of `after` that name jobs outside the list (by id)."""
    vms = {other.vm_identifier for other in batch}
    return [entry for entry in job.after if entry not in vms]
