"""Jobs are Prefect flow runs: this module is the whole mapping between the two."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort, LogSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Scheduled

from api.schemas import JobEta, JobInfo, JobProgress, JobSubmitted, LogLine
from core.errors import Conflict, JobNotFound
from core.models import ConvertRequest, JobDefinition, JobStatus
from tasks.progress import LABEL
from tasks.warm import CUTOVER_LABEL, TEST_BOOT_LABEL, WARM_PHASE

ROLLED_BACK_LABEL = f"{LABEL}rolled_back_at"
ROLLBACK_LABEL = f"{LABEL}rollback"

FLOWS = ("migrate-vm", "convert-vm")
FINISHED_KEPT = 10_000  # finished jobs' answers kept in memory
PAGE_SECONDS = 1.0  # how long a page of jobs is shared between requests
STATUS_OF: dict[StateType, JobStatus] = {
    StateType.SCHEDULED: JobStatus.PENDING,
    StateType.PENDING: JobStatus.PENDING,
    StateType.PAUSED: JobStatus.WAITING,
    StateType.RUNNING: JobStatus.RUNNING,
    StateType.COMPLETED: JobStatus.COMPLETED,
    StateType.FAILED: JobStatus.FAILED,
    StateType.CRASHED: JobStatus.FAILED,
    StateType.CANCELLING: JobStatus.CANCELLED,
    StateType.CANCELLED: JobStatus.CANCELLED,
}
STATE_TYPES_OF: dict[JobStatus, list[StateType]] = {}
for _type, _status in STATUS_OF.items():
    STATE_TYPES_OF.setdefault(_status, []).append(_type)


def export_folder_tag(folder: Path) -> str:
    """The tag of the jobs exporting into `folder` (resolved): a short digest of it."""
    return "export-dir:" + hashlib.sha256(str(folder).encode()).hexdigest()[:20]


def job_status(run: FlowRun) -> JobStatus:
    return STATUS_OF[run.state.type] if run.state else JobStatus.PENDING


def _label_time(run: FlowRun, label: str) -> datetime | None:
    value = (run.labels or {}).get(label)
    return datetime.fromisoformat(str(value)) if value else None


def _parse_id(job_id: str) -> UUID:
    try:
        return UUID(job_id)
    except ValueError:
        raise JobNotFound(f"no job {job_id!r} (job ids are UUIDs)") from None


class Jobs:
    """Submit, read, follow and cancel jobs through one Prefect client."""

    def __init__(self, client: PrefectClient, *, deployment: str) -> None:
        self.client = client
        self.deployment = deployment  # the deployments' name, e.g. "hypervisord"
        self._deployment_ids: dict[str, UUID] = {}
        self._finished: OrderedDict[str, JobInfo] = OrderedDict()  # by job id, LRU
        self._pages: dict[tuple[Any, ...], tuple[float, asyncio.Future[Any]]] = {}
        # one small lock per VM and export folder ever submitted here (bounded)
        self._locks: dict[str, asyncio.Lock] = {}

    async def _deployment(self, flow_name: str) -> UUID:
        if flow_name not in self._deployment_ids:
            deployment = await self.client.read_deployment_by_name(
                f"{flow_name}/{self.deployment}")
            self._deployment_ids[flow_name] = deployment.id
        return self._deployment_ids[flow_name]

    async def _create(self, flow_name: str, parameters: dict[str, Any],
                      tags: list[str]) -> JobSubmitted:
        run = await self.client.create_flow_run_from_deployment(
            await self._deployment(flow_name), parameters=parameters, tags=["hypersdk", *tags])
        return JobSubmitted(job_id=str(run.id), status=job_status(run),
                            created_at=run.created or datetime.now(UTC))

    async def submit(self, job: JobDefinition, *, vm: str, folder: Path) -> JobSubmitted:
        """A migrate-vm run of `job`, unless the VM (tagged `vm`) has a job already or
        another job writes into its export `folder`: Conflict, naming that job. Both are
        tags of the run, so one small query finds a clash; submissions touching one VM or
        folder are serialized, so that two at once cannot both pass."""
        folder_tag = export_folder_tag(folder)
        async with contextlib.AsyncExitStack() as locks:
            for key in sorted({vm, folder_tag}):  # one order: no deadlock
                await locks.enter_async_context(self._locks.setdefault(key, asyncio.Lock()))
            if (run := await self.holder(vm, folder_tag)) is not None:
                what = (f"VM {job.vm_identifier!r} already has" if vm in run.tags
                        else f"export folder {folder} is in use by")
                raise Conflict(f"{what} job {run.id} ({job_status(run).value}); one job "
                               "per VM and folder at a time: wait for it or cancel it")
            # the tags ride along in Prefect's events: the websocket needs no lookup
            return await self._create(
                "migrate-vm", {"job": job.model_dump(mode="json")},
                [f"provider:{job.provider}", f"vm:{job.vm_identifier}", vm, folder_tag])

    async def holder(self, *tags: str) -> FlowRun | None:
        """An active job (pending, running, cancelling) carrying any of `tags` (a VM's, an
        export folder's), if one is."""
        flows, runs_filter = _due_runs(STATE_TYPES_OF[JobStatus.PENDING]
                                       + STATE_TYPES_OF[JobStatus.RUNNING]
                                       + [StateType.CANCELLING])
        runs_filter.tags = FlowRunFilterTags(any_=list(tags))
        runs = await self.client.read_flow_runs(flow_filter=flows, flow_run_filter=runs_filter,
                                                limit=1)
        return runs[0] if runs else None

    async def throughput(self, provider: str, *, jobs: int = 10) -> float | None:
        """Bytes of disk a second over the last `jobs` completed migrations from
        `provider` (their disks' virtual sizes over their steps' time); None before any."""
        flows, runs_filter = _due_runs(STATE_TYPES_OF[JobStatus.COMPLETED])
        runs_filter.tags = FlowRunFilterTags(all_=[f"provider:{provider}"])
        runs = await self.client.read_flow_runs(
            flow_filter=flows, flow_run_filter=runs_filter,
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=jobs)
        moved = seconds = 0.0
        for run in runs:
            result = await _result(run)
            if not result or "export" not in result:
                continue
            moved += sum(d.get("capacity_bytes", 0) for d in result["export"]["vm"]["disks"])
            seconds += sum(result.get("step_seconds", {}).values())
        return moved / seconds if moved and seconds else None

    async def submit_conversion(self, request: ConvertRequest) -> JobSubmitted:
        return await self._create("convert-vm", {"request": request.model_dump(mode="json")},
                                  ["convert", f"vm:{PurePath(request.source_path).stem}"])

    async def run(self, job_id: str) -> FlowRun:
        try:
            run = await self.client.read_flow_run(_parse_id(job_id))
        except ObjectNotFound:
            raise JobNotFound(f"no job {job_id!r}") from None
        return run

    def info(self, run: FlowRun) -> JobInfo:
        job = run.parameters.get("job") or run.parameters.get("request") or {}
        status = job_status(run)
        message = run.state.message if run.state else None
        return JobInfo(
            job_id=str(run.id),
            name=run.name,
            status=status,
            state=(run.state.name if run.state else None) or "Unknown",
            vm_identifier=job.get("vm_identifier") or (
                PurePath(job["source_path"]).stem if "source_path" in job else None),
            provider=job.get("provider"),
            created_at=run.created,
            started_at=run.start_time,
            finished_at=run.end_time,
            error=message if status in (JobStatus.FAILED, JobStatus.CANCELLED) else None,
            definition=job or None,
            rolled_back_at=_label_time(run, ROLLED_BACK_LABEL),
            rollback=str(summary) if (summary := (run.labels or {}).get(ROLLBACK_LABEL)) else None,
        )

    async def query(self, job_id: str) -> JobInfo:
        """The job's status, and its result once finished. A finished job's answer does
        not change (until a retry, or any state change Prefect reports, forgets it), so
        it is kept: asking again costs no call to Prefect and no read of the result."""
        cached = self._finished.get(job_id)
        if cached is not None:
            self._finished.move_to_end(job_id)
            return cached.model_copy()
        run = await self.run(job_id)
        info = self.info(run)
        # a failed run may carry a result too (a backup run's report names what failed)
        if info.status in (JobStatus.COMPLETED, JobStatus.FAILED) and run.state is not None:
            info.result = await _result(run)
        if run.state is not None and run.state.is_final():
            self._finished[str(run.id)] = info.model_copy()
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
        return info

    def forget(self, job_id: str) -> None:
        """The job's state changed: its kept answer is stale."""
        self._finished.pop(job_id, None)

    async def on_event(self, event: dict[str, Any]) -> None:
        """An event listener: any news of a job forgets its kept answer."""
        if event.get("job_id"):
            self.forget(str(event["job_id"]))

    async def page(self, status: JobStatus | None, *, limit: int, offset: int
                   ) -> tuple[list[JobInfo], int]:
        """A page of jobs, newest first, and how many there are. Pages are shared for up
        to PAGE_SECONDS: a dashboard polled by many clients costs Prefect one read per
        page a second (reading 50 runs is Prefect's slowest common answer, p99 ~75 ms
        alone and several times that while jobs write their progress)."""
        key = (status, limit, offset)
        now = asyncio.get_running_loop().time()
        cached = self._pages.get(key)
        if cached is None or cached[0] < now:
            cached = (now + PAGE_SECONDS, asyncio.ensure_future(self._read_page(*key)))
            self._pages[key] = cached
            for stale in [k for k, (until, _) in self._pages.items() if until < now]:
                del self._pages[stale]
        try:
            infos, total = await asyncio.shield(cached[1])
        except Exception:
            self._pages.pop(key, None)  # a failed read is not shared
            raise
        return [info.model_copy() for info in infos], total

    async def _read_page(self, status: JobStatus | None, limit: int, offset: int
                         ) -> tuple[list[JobInfo], int]:
        flows, runs_filter = _due_runs(STATE_TYPES_OF[status] if status else None)
        runs, total = await asyncio.gather(  # two independent reads, side by side
            self.client.read_flow_runs(
                flow_filter=flows, flow_run_filter=runs_filter,
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit, offset=offset),
            self.client.count_flow_runs(flow_filter=flows, flow_run_filter=runs_filter))
        return [self.info(run) for run in runs], total

    async def active(self, *, limit: int = 200) -> list[tuple[JobInfo, JobProgress]]:
        """Running, then pending jobs (up to `limit` of each), with their progress: one
        read per state, no call per job."""
        found: list[tuple[JobInfo, JobProgress]] = []
        for status in (JobStatus.RUNNING, JobStatus.PENDING):
            flows, runs_filter = _due_runs(STATE_TYPES_OF[status])
            runs = await self.client.read_flow_runs(
                flow_filter=flows, flow_run_filter=runs_filter,
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)
            found += [(self.info(run), progress_of(run)) for run in runs]
        return found

    async def progress(self, job_id: str) -> JobProgress:
        return progress_of(await self.run(job_id))

    async def eta(self, job_id: str) -> JobEta:
        run = await self.run(job_id)
        progress = progress_of(run)
        eta = progress.eta_seconds
        return JobEta(
            job_id=progress.job_id, status=progress.status, percentage=progress.percentage,
            elapsed_seconds=_elapsed(run), eta_seconds=eta,
            estimated_completion=(datetime.now(UTC) + timedelta(seconds=eta)
                                  if eta is not None else run.end_time),
        )

    async def logs(self, job_id: str, *, offset: int = 0) -> list[LogLine]:
        run = await self.run(job_id)
        records = await self.client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
            sort=LogSort.TIMESTAMP_ASC, offset=offset, limit=200)
        return [LogLine(timestamp=r.timestamp, level=_level(r.level), logger=r.name,
                        message=r.message) for r in records]

    async def follow_logs(self, job_id: str, *, poll: float = 1.0,
                          settle: float = 3.0) -> AsyncIterator[LogLine]:
        """Every log line of the job, as it arrives, until the job has ended (and the
        logs Prefect sends in batches have had `settle` seconds to land)."""
        seen = 0
        ended_at: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.logs(job_id, offset=seen)
            seen += len(batch)
            for line in batch:
                yield line
            if len(batch) == 200:
                continue
            if ended_at is None and job_status(await self.run(job_id)).finished:
                ended_at = loop.time()
            if ended_at is not None and loop.time() - ended_at >= settle:
                return
            await asyncio.sleep(poll)

    async def retry(self, job_id: str) -> str:
        """Run a failed or cancelled job again: steps that finished are not redone (their
        results are persisted and cached per job)."""
        run = await self.run(job_id)
        status = job_status(run)
        if status not in (JobStatus.FAILED, JobStatus.CANCELLED) or not (
                run.state and run.state.is_final()):
            raise Conflict(f"job {job_id} is {status.value}; only failed or cancelled jobs "
                           "can be retried")
        await self.client.set_flow_run_state(run.id, Scheduled(message="retried by request"),
                                             force=True)
        self.forget(str(run.id))
        return "pending"

    async def cancel(self, job_id: str) -> tuple[str, str]:
        run = await self.run(job_id)
        if run.state is None or run.state.is_final():
            status = job_status(run).value
            raise Conflict(f"job {job_id} has already ended ({status}); nothing to cancel")
        if run.state.type in (StateType.SCHEDULED, StateType.PENDING) or (
                run.state.type == StateType.PAUSED and run.state.state_details.pause_reschedule):
            await self.client.set_flow_run_state(run.id, Cancelled(message="cancelled by request"),
                                                 force=True)
            return "cancelled", "the job had not started; it will not run"
        if run.state.type == StateType.CANCELLING:
            return "cancelling", "the job is already being cancelled"
        await self.client.set_flow_run_state(run.id, Cancelling(message="cancelled by request"),
                                             force=run.state.type == StateType.PAUSED)
        return "cancelling", "the job's processes are being stopped and partial files removed"

    async def _warm_run(self, job_id: str, what: str) -> FlowRun:
        run = await self.run(job_id)
        job = run.parameters.get("job") or {}
        if not (job.get("options") or {}).get("warm"):
            raise Conflict(f"job {job_id} is not a warm migration; it has no {what}")
        return run

    async def _ask(self, run: FlowRun, label: str, when: datetime,
                   run_input: dict[str, Any]) -> None:
        """Leave the request on the run (read when its round ends) and, if it is paused
        between rounds, resume it with the same input the Prefect UI's form sends."""
        await self.client.update_flow_run_labels(run.id, {label: when.isoformat()})
        if run.state is not None and run.state.type == StateType.PAUSED:
            with contextlib.suppress(ObjectNotFound):  # resumed meanwhile: the label holds
                await self.client.resume_flow_run(run.id, run_input=run_input)
        self.forget(str(run.id))

    async def cutover(self, job_id: str, *, at: datetime | None) -> tuple[str, str]:
        """A warm job's cutover, now or at `at` (a time past is now)."""
        run = await self._warm_run(job_id, "cutover")
        if run.state is None or run.state.is_final():
            raise Conflict(f"job {job_id} has ended ({job_status(run).value}); nothing to "
                           "cut over")
        phase = (run.labels or {}).get(f"{LABEL}{WARM_PHASE}")
        if phase not in (None, "precopy", "sync"):
            raise Conflict(f"job {job_id} is past its sync rounds (phase {phase}); its "
                           "cutover has begun")
        now = datetime.now(UTC)
        when = now if at is None else max(at if at.tzinfo else at.replace(tzinfo=UTC), now)
        await self._ask(run, CUTOVER_LABEL, when,
                        {"action": "cutover", "at": when.isoformat()})
        return (job_status(run).value,
                "cutting over now" if when == now else f"cutover at {when.isoformat()}")

    async def test_boot(self, job_id: str) -> tuple[str, str]:
        """Boot an overlay of a warm job's copy as it is now, between its rounds."""
        run = await self._warm_run(job_id, "test boot")
        phase = (run.labels or {}).get(f"{LABEL}{WARM_PHASE}")
        if run.state is None or run.state.is_final() or phase != "sync":
            raise Conflict(f"job {job_id} is {job_status(run).value}"
                           f"{f' (phase {phase})' if phase else ''}; a test boot needs a "
                           "warm job between its sync rounds, its precopy done")
        await self._ask(run, TEST_BOOT_LABEL, datetime.now(UTC), {"action": "test-boot"})
        return job_status(run).value, "a test boot of the copy as it is now is under way"

    async def record_rollback(self, run: FlowRun, summary: str) -> None:
        await self.client.update_flow_run_labels(run.id, {
            ROLLED_BACK_LABEL: datetime.now(UTC).isoformat(), ROLLBACK_LABEL: summary})
        self.forget(str(run.id))

    async def rollback_target(self, job_id: str) -> tuple[FlowRun, dict[str, Any]]:
        """A warm job that cut over (its run and result), not rolled back yet."""
        run = await self._warm_run(job_id, "rollback")
        if job_status(run) != JobStatus.COMPLETED or run.state is None:
            raise Conflict(f"job {job_id} is {job_status(run).value}; only a warm job that "
                           "cut over (completed) can be rolled back")
        if (run.labels or {}).get(ROLLED_BACK_LABEL):
            raise Conflict(f"job {job_id} was rolled back already, at "
                           f"{run.labels[ROLLED_BACK_LABEL]}")
        result = await _result(run)
        if not result:
            raise Conflict(f"job {job_id}'s result cannot be read here; nothing to roll back")
        return run, result


def _due_runs(state_types: list[StateType] | None) -> tuple[FlowFilter, FlowRunFilter]:
    """Filters for the job flows' runs (of these states), leaving out runs a schedule has
    lined up for later: they are not jobs yet, they show once due."""
    due = FlowRunFilterExpectedStartTime(
        before_=datetime.now(UTC) + timedelta(seconds=5))  # type: ignore[arg-type]
    states = (FlowRunFilterState(type=FlowRunFilterStateType(any_=state_types))
              if state_types else None)
    return (FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
            FlowRunFilter(expected_start_time=due, state=states))


def progress_of(run: FlowRun) -> JobProgress:
    """A job's progress, from the labels its tasks write on the flow run."""
    labels = run.labels or {}
    status = job_status(run)

    def label(name: str, default: Any = 0) -> Any:
        return labels.get(f"{LABEL}{name}", default)

    def known(name: str, kind: type[float]) -> Any:  # a warm job's: absent on others
        value = labels.get(f"{LABEL}{name}")
        return None if value is None else kind(value)

    percentage = 100.0 if status == JobStatus.COMPLETED else float(label("percentage", 0.0))
    updated = label("updated_at", None)
    return JobProgress(
        job_id=str(run.id), status=status,
        phase=str(label("phase", "pending" if status == JobStatus.PENDING else "starting")),
        step=str(label("step", "")) or None,
        percentage=percentage,
        bytes_done=int(label("bytes_done")), bytes_total=int(label("bytes_total")),
        rate_bps=float(label("rate_bps")),
        eta_seconds=_eta(run, percentage, status),
        updated_at=datetime.fromtimestamp(float(updated), UTC) if updated else None,
        round=known("round", int), changed_bytes=known("changed_bytes", int),
        estimated_downtime_seconds=known("estimated_downtime_seconds", float),
    )


def _level(number: int) -> str:
    return {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}.get(
        number, str(number))


def _elapsed(run: FlowRun) -> float:
    if not run.start_time:
        return 0.0
    end = run.end_time or datetime.now(UTC)
    return max(0.0, (end - run.start_time).total_seconds())


def _eta(run: FlowRun, percentage: float, status: JobStatus) -> float | None:
    """Time left, extrapolated from the time spent so far and the share done."""
    if status.finished:
        return 0.0
    if status != JobStatus.RUNNING or percentage <= 0:
        return None
    elapsed = _elapsed(run)
    return round(elapsed * (100.0 - percentage) / percentage, 1)


async def _result(run: FlowRun) -> dict[str, Any] | None:
    """The flow's persisted result, when this process can read its storage."""
    assert run.state is not None
    try:
        value = await run.state.aresult(raise_on_failure=False)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - results on storage we cannot reach are optional
        return None
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if dump else None
