"""A warm migration's copy: the disks copied while the VM runs (the precopy), then only what
changed, a round every `precopy_interval`, until someone cuts over; then a last round with
the VM off, and the images get their final names.

Between rounds the run is Paused with a form (`Cutover`): the Prefect UI shows it waiting
with a Resume button, `POST /jobs/cutover` resumes it with the same input, and the pause
times out into the next round. A cutover asked for while a round runs (the run is not
paused then) is left on the run as a label, read when the round ends."""

from __future__ import annotations

import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Running

from core.config import config_from_env
from core.models import ConvertedDisk, JobDefinition, SyncRound, VMInfo, WarmReport
from hyper2kvm import qemu_img
from hyper2kvm.convert import output_paths
from hyper2kvm.output import OutputImage
from providers import get_provider
from tasks.export import only_transient
from tasks.progress import LABEL, JobProgress, current_flow_run_id

CUTOVER_LABEL = f"{LABEL}cutover_at"  # where the API leaves a cutover asked for mid-round
POLL_SECONDS = 2  # how often a paused run looks for its resume


class Cutover(RunInput):
    """Cut this warm migration over: the VM is stopped, the last changes copied, the domain
    defined. Leave `at` empty for now, or give a time (UTC) within a cutover window."""

    at: datetime | None = None


def _size(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


@task(name="sync-round", task_run_name="sync round {number}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=only_transient)
def sync_round(job: JobDefinition, vm: VMInfo, folder: Path,
               output_format: Literal["qcow2", "raw"], number: int, *,
               final: bool = False) -> SyncRound:
    """Round `number` (0: the precopy, into new images): each disk's image brought up to
    date with the VM's disk as it is now. A failed round leaves the images as complete
    as the last round that finished, or better (the next compares again)."""
    settings = config_from_env()
    progress = JobProgress.for_current_run(job.vm_identifier)
    targets = output_paths(vm.name, len(vm.disks), folder, output_format)
    outputs = [OutputImage(target, output_format=output_format, size=disk.capacity_bytes)
               for target, disk in zip(targets, vm.disks, strict=True)]
    phase = "precopy" if number == 0 else "cutover" if final else "sync"
    progress.start(phase, sum(disk.capacity_bytes for disk in vm.disks))
    started = time.monotonic()
    opened: list[OutputImage] = []
    try:
        for output in outputs:
            if number == 0:  # a retried precopy starts over
                output.partial.unlink(missing_ok=True)
            opened.append(output.open(again=number > 0))
        with get_provider(job.provider, settings) as provider:
            changed = provider.warm_round(job.vm_identifier, outputs, final=final,
                                          progress=progress.advance,
                                          job=str(current_flow_run_id()))
        for output in outputs:
            output.finish()
    finally:
        for output in opened:
            output.close()
    progress.finish()
    done = SyncRound(round=number, changed_bytes=changed,
                     seconds=round(time.monotonic() - started, 3), final=final)
    get_run_logger().info("%s of %s: %s written in %.1f s", "precopy" if number == 0 else
                          f"round {number}", vm.name, _size(changed), done.seconds)
    return done


def requested_cutover() -> datetime | None:
    """The cutover time the API left on the run, if any."""
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(current_flow_run_id()).labels or {}
    value = labels.get(CUTOVER_LABEL)
    return datetime.fromisoformat(str(value)) if value else None


def wait_for_cutover(seconds: float) -> datetime | None:
    """Paused for up to `seconds`, waiting for a `Cutover`; the time asked for, or None
    when the pause ran out (time for the next round)."""
    try:
        answer = pause_flow_run(wait_for_input=Cutover, timeout=max(1, math.ceil(seconds)),
                                poll_interval=POLL_SECONDS)
    except FlowPauseTimeout:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(current_flow_run_id())
            if run.state is not None and run.state.is_paused():
                client.set_flow_run_state(run.id, Running(message="next sync round"),
                                          force=True)
                return None
        if run.state is not None and run.state.is_running():  # resumed as the pause ran out
            return requested_cutover() or datetime.now(UTC)
        raise RuntimeError(f"the run left its pause as {run.state}") from None  # cancelled
    return answer.at or datetime.now(UTC)


def copy_warm(job: JobDefinition, vm: VMInfo, folder: Path,
              output_format: Literal["qcow2", "raw"]) -> WarmReport:
    """The precopy and the sync rounds, until the cutover is due; then the final round.
    The images keep their partial names (see `commit_warm`)."""
    progress = JobProgress.for_current_run(job.vm_identifier)
    report = WarmReport(rounds=[sync_round(job, vm, folder, output_format, 0)])
    cutover = job.options.cutover_at
    next_round = time.monotonic() + job.options.precopy_interval
    while True:
        cutover = requested_cutover() or cutover
        now = datetime.now(UTC)
        if cutover is not None and cutover <= now:
            break
        wait = next_round - time.monotonic()
        if cutover is not None:
            wait = min(wait, (cutover - now).total_seconds())
        if wait > 0:
            last = report.rounds[-1]
            progress.note(round=str(last.round), changed_bytes=str(last.changed_bytes),
                          estimated_downtime_seconds=str(last.seconds))
            when = f" at {cutover:%Y-%m-%d %H:%M:%S} UTC" if cutover else ""
            progress.step(f"waiting for cutover{when}; round {last.round} wrote "
                          f"{_size(last.changed_bytes)} in {last.seconds:.1f} s", 1.0)
            asked = wait_for_cutover(wait)
            if asked is not None:
                cutover = asked
            continue
        report.rounds.append(sync_round(job, vm, folder, output_format, len(report.rounds)))
        next_round = time.monotonic() + job.options.precopy_interval
    report.cutover_at = datetime.now(UTC)
    get_run_logger().info("cutover of %s: the last round", vm.name)
    report.rounds.append(sync_round(job, vm, folder, output_format, len(report.rounds),
                                    final=True))
    return report


def commit_warm(vm: VMInfo, folder: Path, output_format: Literal["qcow2", "raw"],
                report: WarmReport) -> list[ConvertedDisk]:
    """The final round's images under their final names."""
    seconds = round(sum(r.seconds for r in report.rounds), 3)
    disks = []
    for index, target in enumerate(output_paths(vm.name, len(vm.disks), folder, output_format)):
        partial = OutputImage(target, output_format=output_format, size=0).partial
        os.replace(partial, target)
        facts = qemu_img.info(qemu_img.DiskSource(target, output_format))
        disks.append(ConvertedDisk(
            source=vm.disks[index].file or vm.disks[index].name, path=target,
            format=output_format, virtual_size=int(facts["virtual-size"]),
            actual_size=int(facts.get("actual-size", 0)), seconds=seconds))
    return disks
