"""A warm migration's copy: the disks copied while the VM runs (the precopy), then only what
changed, a round every `precopy_interval`, until someone cuts over; then a last round with
the VM off, and the images get their final names.

Between rounds the run is Paused with a form (`WarmAction`: cut over, test boot, or a sync
round now): the Prefect UI shows it waiting with a Resume button, the API resumes it with
the same input, and when the interval is up the job resumes itself for its next round.
What the API asks is also left on the run as labels (a cutover time, a test boot's time),
so a request made while a round runs (the run is not paused then) is read when the round
ends."""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from core.config import config_from_env
from core.errors import StaleCopy
from core.files import partial_path, side_files
from core.models import ConvertedDisk, JobDefinition, SyncRound, VMInfo, WarmReport
from hyper2kvm import qemu_img
from hyper2kvm.convert import output_paths
from hyper2kvm.output import OutputImage
from providers import get_provider
from providers.base import WarmRound
from tasks.export import only_transient
from tasks.progress import LABEL, JobProgress, current_flow_run_id
from tasks.trial_boot import trial_boot
from tasks.waves import wait_for_upstream

CUTOVER_LABEL = f"{LABEL}cutover_at"  # a cutover the API asked for (read between rounds)
TEST_BOOT_LABEL = f"{LABEL}test_boot_at"  # a test boot the API asked for
WARM_PHASE = "warm_phase"  # precopy, sync, cutover: what the API lets a request reach
POLL_SECONDS = 1  # how often a paused run looks for its resume
MIN_PAUSE = 3.0  # a shorter wait is slept through, not paused
PAUSE_EXPIRY = 7 * 86400  # seconds past the wait


class WarmAction(RunInput):
    """What to do with this warm migration now. `cutover`: the VM is stopped, the last
    changes copied, the domain defined (leave `at` empty for now, or give a time in UTC
    within a cutover window). `test-boot`: boot an overlay of the copy as it is, while the
    VM keeps running. `sync`: a sync round now (the job does one every precopy_interval;
    one just before a cutover makes the cutover shorter)."""

    action: Literal["cutover", "test-boot", "sync"] = "cutover"
    at: datetime | None = None


@dataclass
class Requests:
    """What was asked of the job so far (by the API's labels or the UI's form)."""

    cutover: datetime | None = None
    test_boot: datetime | None = None  # the newest test boot asked for


def _stamp(value: object) -> datetime | None:
    return datetime.fromisoformat(str(value)) if value else None


def read_requests(requests: Requests) -> Requests:
    """`requests` with what the API left on the run since."""
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(current_flow_run_id()).labels or {}
    return Requests(cutover=_stamp(labels.get(CUTOVER_LABEL)) or requests.cutover,
                    test_boot=max(filter(None, [_stamp(labels.get(TEST_BOOT_LABEL)),
                                                requests.test_boot]), default=None))


def _end_pause(run_id: UUID, done: threading.Event) -> None:
    """Resume the run for its next round once it is paused (unless resumed already)."""
    with get_client(sync_client=True) as client:
        while not done.is_set():
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_paused():
                client.resume_flow_run(run_id, run_input={"action": "sync"})
                return
            done.wait(0.5)


def wait_for_action(seconds: float) -> WarmAction:
    """Paused for up to `seconds`, waiting for a `WarmAction` (the Prefect UI shows its
    form; the API resumes with the same input). The pause is ended by a timer of ours
    asking for the next round, not by its own timeout: Prefect fails a run whose pause
    expires. Its expiry (a week on) only ends a job whose process died unnoticed."""
    if seconds < MIN_PAUSE:
        time.sleep(max(seconds, 0))
        return WarmAction(action="sync")
    done = threading.Event()
    timer = threading.Timer(seconds, _end_pause, args=(current_flow_run_id(), done))
    timer.daemon = True
    timer.start()
    try:
        # a key of its own: a rerun of the job (after a restart) counts its pauses from 1
        # again, and Prefect answers a key it has seen with that pause's input
        return pause_flow_run(wait_for_input=WarmAction,
                              timeout=math.ceil(seconds) + PAUSE_EXPIRY,
                              poll_interval=POLL_SECONDS, key=uuid.uuid4().hex)
    finally:
        done.set()
        timer.cancel()


def _size(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def _round(job: JobDefinition, outputs: list[OutputImage], *, again: bool, final: bool,
           progress: JobProgress) -> WarmRound:
    """The provider's round into `outputs`: new images, or `again` the partial ones."""
    if not again:
        for output in outputs:
            output.partial.unlink(missing_ok=True)
            for side in side_files(output.target):
                side.unlink()
    opened: list[OutputImage] = []
    try:
        for output in outputs:
            opened.append(output.open(again=again))
        with get_provider(job.provider, config_from_env()) as provider:
            done = provider.warm_round(job.vm_identifier, outputs, options=job.options,
                                       final=final, progress=progress.advance,
                                       job=str(current_flow_run_id()))
        for output in outputs:
            output.finish()
    finally:
        for output in opened:
            output.close()
    return done


@task(name="sync-round", task_run_name="sync round {number}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=only_transient)
def sync_round(job: JobDefinition, vm: VMInfo, folder: Path,
               output_format: Literal["qcow2", "raw"], number: int, *,
               final: bool = False) -> SyncRound:
    """Round `number` (0: the precopy): each disk's image brought up to
    date with the VM's disk as it is now. A failed round leaves the images as complete
    as the last round that finished, or better (the next compares again)."""
    progress = JobProgress.for_current_run(job.vm_identifier)
    targets = output_paths(vm.name, len(vm.disks), folder, output_format)
    outputs = [OutputImage(target, output_format=output_format, size=disk.capacity_bytes)
               for target, disk in zip(targets, vm.disks, strict=True)]
    phase = "precopy" if number == 0 else "cutover" if final else "sync"
    progress.start(phase, sum(disk.capacity_bytes for disk in vm.disks))
    started = time.monotonic()
    # a precopy continues the copy an earlier run of the job left (a daemon restarted while
    # it waited for its cutover), unless the source cannot say what changed since
    again = number > 0 or all(output.partial.is_file() for output in outputs)
    try:
        done = _round(job, outputs, again=again, final=final, progress=progress)
    except StaleCopy as exc:
        get_run_logger().warning("%s; the precopy starts over", exc)
        done = _round(job, outputs, again=False, final=final, progress=progress)
    progress.finish()
    report = SyncRound(round=number, changed_bytes=done.changed_bytes,
                       seconds=round(time.monotonic() - started, 3), final=final,
                       stopped_source=done.stopped_source)
    get_run_logger().info("%s of %s: %s written in %.1f s", "precopy" if number == 0 else
                          f"round {number}", vm.name, _size(report.changed_bytes),
                          report.seconds)
    return report


def copy_warm(job: JobDefinition, vm: VMInfo, folder: Path,
              output_format: Literal["qcow2", "raw"]) -> WarmReport:
    """The precopy and the sync rounds (and the test boots asked for) until the cutover is
    due; then the final round. The images keep their partial names (see `commit_warm`)."""
    progress = JobProgress.for_current_run(job.vm_identifier)
    progress.note(**{WARM_PHASE: "precopy"})
    report = WarmReport(rounds=[sync_round(job, vm, folder, output_format, 0)])
    progress.note(**{WARM_PHASE: "sync"})
    asked = Requests(cutover=job.options.cutover_at)
    # test boots asked for before this are done (or were asked of an earlier run of the job)
    booted_until = datetime.now(UTC)
    next_round = time.monotonic() + job.options.precopy_interval
    while True:
        asked = read_requests(asked)
        if asked.test_boot and asked.test_boot > booted_until:
            booted_until = datetime.now(UTC)
            report.test_boots.append(trial_boot(job, vm, folder, output_format))
            continue
        now = datetime.now(UTC)
        if asked.cutover is not None and asked.cutover <= now:
            break
        wait = next_round - time.monotonic()
        if asked.cutover is not None:
            wait = min(wait, (asked.cutover - now).total_seconds())
        if wait <= 0:
            report.rounds.append(sync_round(job, vm, folder, output_format,
                                            len(report.rounds)))
            next_round = time.monotonic() + job.options.precopy_interval
            continue
        last = report.rounds[-1]
        progress.start("sync", 0)
        progress.note(round=str(last.round), changed_bytes=str(last.changed_bytes),
                      estimated_downtime_seconds=str(last.seconds))
        when = f" at {asked.cutover:%Y-%m-%d %H:%M:%S} UTC" if asked.cutover else ""
        progress.step(f"waiting for cutover{when}; round {last.round} wrote "
                      f"{_size(last.changed_bytes)} in {last.seconds:.1f} s", 1.0)
        progress.sent()
        action = wait_for_action(wait)
        if action.action == "cutover":
            asked.cutover = action.at or datetime.now(UTC)
        elif action.action == "test-boot":
            asked.test_boot = datetime.now(UTC)
        else:
            next_round = time.monotonic()
    progress.note(**{WARM_PHASE: "cutover"})
    wait_for_upstream(job.after, progress=progress)  # a wave cuts over in order
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
        os.replace(partial_path(target), target)
        for side in side_files(target):  # a round's state
            side.unlink()
        facts = qemu_img.info(qemu_img.DiskSource(target, output_format))
        disks.append(ConvertedDisk(
            source=vm.disks[index].file or vm.disks[index].name, path=target,
            format=output_format, virtual_size=int(facts["virtual-size"]),
            actual_size=int(facts.get("actual-size", 0)), seconds=seconds))
    return disks
