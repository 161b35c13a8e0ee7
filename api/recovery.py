"""What a hypervisord finds when it starts, or leaves when it stops, besides itself.

* Runs of the deployments it serves that are still Running, Pending or Cancelling when it
  starts have no process any more: their flow-run processes exit with their daemon
  (core.process). Each has its partial files removed (the flow's own crash hook), then is
  rescheduled to run again from its finished steps (`daemon.resume_interrupted`), or marked
  Crashed; a Cancelling one becomes Cancelled. A warm job that was Paused waiting for its
  cutover keeps its copy and snapshots and is rescheduled: its new run continues the copy
  (tasks.warm) and waits again. A backup run is not resumed (its next
  schedule takes a fresh backup): it and the VM runs it had started are marked Crashed.
* SIGTERM drains (`drain`): no new run starts, running ones get `daemon.shutdown_grace`
  to finish, the rest are stopped and put back in line for the next start.
* The export limit's slots are reconciled with the runs really exporting: the embedded
  server keeps leases in memory, so after a restart a slot held by a run that died would
  otherwise stay taken for good. The daemon also checks every minute, and a run that
  crashes or is cancelled releases its lease at once (tasks.export)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled, Crashed, Scheduled

from core.process import children, command_line
from tasks.export import EXPORT_LIMIT
from tasks.progress import EXPORTING, LABEL

logger = logging.getLogger("hypervisord")
SERVED_FLOWS = ("migrate-vm", "convert-vm", "backup-policy")
# PAUSED: a warm job waiting for its cutover, whose process (it waits in process) is gone
INTERRUPTED = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING, StateType.PAUSED]


async def _runs(client: PrefectClient, states: list[StateType], *,
                deployment: str | None = None) -> list[FlowRun]:
    found: list[FlowRun] = []
    while True:
        batch = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(SERVED_FLOWS))),
            deployment_filter=(DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
                               if deployment else None),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=states))),
            limit=200, offset=len(found))
        found += batch
        if len(batch) < 200:
            return found


def _crash_hook(flow_name: str) -> Callable[..., None] | None:
    """The flow's own clean-up after a crash (partial files removed)."""
    if flow_name == "migrate-vm":
        from flows.migrate_vm import clean_up_after
        return clean_up_after
    if flow_name == "convert-vm":
        from flows.convert_vm import clean_up_after as clean_convert
        return clean_convert
    return None


def _in_backup(run: FlowRun) -> bool:
    return any(tag.startswith("backup:") for tag in run.tags) or run.parent_task_run_id is not None


async def interrupted_runs(client: PrefectClient, *, deployment: str) -> list[FlowRun]:
    """Served runs that are Running, Pending, Cancelling, or paused in their process."""
    return [run for run in await _runs(client, INTERRUPTED, deployment=deployment)
            if not (run.state and run.state.type == StateType.PAUSED
                    and run.state.state_details.pause_reschedule)]


def _waiting_warm(run: FlowRun) -> bool:
    """A warm job that was waiting for its cutover: its copy (and the source's snapshots)
    are what its next run continues from, not leftovers."""
    return run.state is not None and run.state.type == StateType.PAUSED


async def recover(client: PrefectClient, runs: list[FlowRun], *,
                  resume: bool) -> dict[str, list[str]]:
    """Clean up after `runs`, whose processes are gone, and reschedule (or crash or
    cancel) them; returns the job ids by what was done with them."""
    done: dict[str, list[str]] = {"resumed": [], "crashed": [], "cancelled": []}
    flows = {flow_id: (await client.read_flow(flow_id)).name
             for flow_id in {run.flow_id for run in runs}}
    for run in runs:
        flow_name = flows[run.flow_id]
        hook = _crash_hook(flow_name)
        keep = resume and _waiting_warm(run)
        if hook is not None and not keep:
            await asyncio.to_thread(hook, None, run, Crashed())
        assert run.state is not None
        if run.state.type in (StateType.CANCELLING, StateType.CANCELLED):
            state: Any = Cancelled(message="cancelled (hypervisord stopped while it ran)")
            key = "cancelled"
        elif keep:
            state = Scheduled(message="resumed: hypervisord stopped while this warm job "
                                      "waited for its cutover; its copy is continued")
            key = "resumed"
        elif resume and flow_name != "backup-policy" and not _in_backup(run):
            state = Scheduled(message="resumed: hypervisord stopped while it ran; "
                                      "finished steps are not redone")
            key = "resumed"
        else:
            state = Crashed(message="hypervisord stopped while this job ran")
            key = "crashed"
        await client.set_flow_run_state(run.id, state, force=True)
        done[key].append(str(run.id))
    for key, ids in done.items():
        if ids:
            logger.warning("%d interrupted job(s) %s: %s", len(ids), key, ", ".join(ids))
    return done


async def exporting_runs(client: PrefectClient) -> int:
    """Runs that are exporting now, on any host (their progress says so)."""
    running = await _runs(client, [StateType.RUNNING])
    return sum(1 for run in running if (run.labels or {}).get(f"{LABEL}phase") in EXPORTING)


async def _export_slots(client: PrefectClient) -> tuple[int, int]:
    """The export limit's taken slots, and the runs really exporting."""
    limit = await client.read_global_concurrency_limit_by_name(EXPORT_LIMIT)
    return limit.active_slots, await exporting_runs(client)


async def _set_export_slots(client: PrefectClient, taken: int, actual: int) -> None:
    logger.warning("export limit: %d slot(s) taken, %d run(s) exporting; reconciled",
                   taken, actual)
    await client.update_global_concurrency_limit(
        EXPORT_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=actual))


async def reconcile_export_slots(client: PrefectClient) -> None:
    """Set the export limit's taken slots to the runs really exporting."""
    taken, actual = await _export_slots(client)
    if taken != actual:
        await _set_export_slots(client, taken, actual)


async def keep_export_slots_true(client: PrefectClient, *, every: float = 60.0) -> None:
    """Every `every` seconds, free slots that no exporting run holds (never take any). An
    excess must be seen twice in a row: a run that just took its slot labels itself a
    moment later."""
    excess_seen = False
    while True:
        await asyncio.sleep(every)
        try:
            taken, actual = await _export_slots(client)
            if taken > actual and excess_seen:
                await _set_export_slots(client, taken, actual)
            excess_seen = taken > actual
        except Exception as exc:  # noqa: BLE001 - a check that failed is tried again
            logger.warning("export slot check failed: %s", exc)


def flow_processes(daemon_pid: int | None = None) -> list[int]:
    """A daemon's flow-run processes: the children Prefect's runner started (as
    `python -m prefect.engine`, or through multiprocessing's spawn)."""
    return [pid for pid in children(daemon_pid or os.getpid())
            if any("prefect.engine" in part or "spawn_main" in part
                   for part in command_line(pid))]


async def drain(runners: list[Any], client: PrefectClient, *, deployment: str,
                grace: float, resume: bool) -> dict[str, list[str]]:
    """SIGTERM: start no new run, give this daemon's running ones `grace` seconds to
    finish, then stop the rest so that the next start resumes them (not cancelled)."""
    for runner in runners:
        # no new run from now on: the runner's scheduled-run poller (Prefect 3.9) has its
        # own flag; with only the runner's set, a run put back in line below would be
        # taken again at once, then cancelled by the runner's stop
        runner.stopping = True
        poller = getattr(runner, "_scheduled_run_poller", None)
        if poller is not None:
            poller.stopping = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    running = flow_processes()
    if running:
        logger.info("waiting up to %.0f s for %d running job(s) to finish", grace,
                    len(running))
    # a finished run's process still reports its final state and flushes its logs:
    # stopping the runner before it exits would cancel the run it just completed
    while running and loop.time() < deadline:
        await asyncio.sleep(0.2)
        running = flow_processes()
    if not running:
        return {}
    before = {run.id for run in await _runs(client, [StateType.RUNNING, StateType.PENDING],
                                            deployment=deployment)}
    stopped_pids = running
    logger.warning("stopping %d job(s) still running after %.0f s; they resume at the next "
                   "start", len(stopped_pids), grace)
    for pid in stopped_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # the runner sees its processes die, marks their runs crashed and runs their crash
    # hooks (partial files removed); then they are put back in line. (The runs of these
    # deployments are this daemon's: one serving hypervisord per Prefect server.)
    settle = loop.time() + 30
    crashed: list[FlowRun] = []
    while loop.time() < settle:
        runs = [await client.read_flow_run(run_id) for run_id in before]
        crashed = [run for run in runs
                   if run.state is not None and run.state.type == StateType.CRASHED]
        if all(run.state is None or run.state.is_final() for run in runs):
            break
        await asyncio.sleep(0.5)
    return await recover(client, crashed, resume=resume)
