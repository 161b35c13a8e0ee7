"""Jobs: submit, query, progress, ETA, logs, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, JobsDep, SettingsDep
from api.jobs import Jobs
from api.rollback import roll_back
from api.schemas import (
    CutoverRequest,
    DryRuns,
    JobAction,
    JobEta,
    JobInfo,
    JobList,
    JobLogs,
    JobProgress,
    JobRef,
    JobsSubmitted,
    JobSubmitted,
    RollbackRequest,
)
from api.waves import external_ids, wave_order
from core.config import Config
from core.errors import Conflict, InvalidRequest, JobNotFound, RegistrationError
from core.models import Blocker, DryRun, JobDefinition, JobStatus, MigrationResult
from core.paths import safe_name
from flows.migrate_vm import converts_in_flow, export_dir
from hyper2kvm.registration import name_taken
from providers import get_provider
from tasks.preflight import dry_run, warm_problem
from tasks.validate import vm_tag

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[ApiKeyDep])


def validate_job(job: JobDefinition, settings: Config) -> tuple[str, Path]:
    """Checks that can fail cheaply, before a run exists: the export path stays under
    export.base_path, the provider is configured, the VM exists and the provider can
    export it as asked. Returns the VM's tag and the export folder."""
    folder = export_dir(job, settings)
    if (problem := warm_problem(job, converts=converts_in_flow(job))) is not None:
        raise InvalidRequest(problem)
    with get_provider(job.provider, settings) as provider:
        vm = provider.get_vm(job.vm_identifier)
        provider.check_export(vm, job.options, converts=converts_in_flow(job))
    if converts_in_flow(job) and not job.hyper2kvm_integration.replace_existing:
        refuse_existing_domain(vm.name, settings.hyper2kvm.libvirt_uri)
    return vm_tag(job.provider, vm.identifier), folder


def refuse_existing_domain(vm_name: str, uri: str) -> None:
    """A domain of the VM's name is defined already: 409 now, not after the copy. (Where
    this host's libvirt does not answer, the conversion host's validate step checks.)"""
    try:
        taken = name_taken(uri, safe_name(vm_name))
    except RegistrationError:
        return
    if taken is not None:
        raise Conflict(taken)


async def dry_run_of(job: JobDefinition, jobs: Jobs, settings: Config) -> DryRun:
    """The job's dry run, with a VM that has a job already counted as a blocker."""
    export_dir(job, settings)  # an export path outside export.base_path is a 400 still
    report = await run_in_threadpool(
        dry_run, job, settings, converts=converts_in_flow(job),
        throughput=await jobs.throughput(job.provider))
    holder = await jobs.holder(vm_tag(job.provider, report.vm.identifier))
    if holder is not None:
        report.blockers.append(Blocker(code="vm_busy", message=(
            f"VM {job.vm_identifier!r} already has job {holder.id}; one job per VM at a "
            "time: wait for it or cancel it")))
    return report


@router.post("/submit", response_model=JobSubmitted | JobsSubmitted | DryRun | DryRuns)
async def submit_jobs(
    body: Annotated[JobDefinition | list[JobDefinition], Body()],
    jobs: JobsDep,
    settings: SettingsDep,
) -> JobSubmitted | JobsSubmitted | DryRun | DryRuns:
    """Submit one job, or a list of jobs (all validated before any is created). With
    `dry_run` (on every job of a list) nothing is created: the answer says what each job
    would do and what stops it."""
    batch = body if isinstance(body, list) else [body]
    if any(job.dry_run for job in batch):
        if not all(job.dry_run for job in batch):
            raise InvalidRequest("dry_run is set on some jobs of the list and not on others; "
                                 "set it on all of them or none")
        reports = [await dry_run_of(job, jobs, settings) for job in batch]
        return DryRuns(jobs=reports) if isinstance(body, list) else reports[0]
    checked = [await run_in_threadpool(validate_job, job, settings) for job in batch]
    tags, folders = [tag for tag, _ in checked], [folder for _, folder in checked]
    twice = next((job for i, job in enumerate(batch) if tags[i] in tags[:i]), None)
    if twice is not None:
        raise Conflict(f"VM {twice.vm_identifier!r} is in the list twice; one job per VM "
                       "at a time")
    if len(set(folders)) < len(folders):
        raise Conflict("two jobs of the list export into the same folder")
    order, within = wave_order(batch)
    for job in batch:
        for job_id in external_ids(job, batch):
            try:
                await jobs.run(job_id)
            except JobNotFound:
                raise InvalidRequest(f"job {job.vm_identifier}: after names job {job_id}, "
                                     "which does not exist") from None
    submitted: dict[int, JobSubmitted] = {}
    for index in order:  # a job's upstream jobs of the list exist before it
        job = batch[index]
        after = [*external_ids(job, batch), *(submitted[i].job_id for i in within[index])]
        submitted[index] = await jobs.submit(job.model_copy(update={"after": after}),
                                             vm=tags[index], folder=folders[index])
    created = [submitted[index] for index in range(len(batch))]
    return JobsSubmitted(jobs=created) if isinstance(body, list) else created[0]


@router.get("/query", response_model=JobInfo | JobList)
async def query_jobs(
    jobs: JobsDep,
    job_id: str | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobInfo | JobList:
    """One job by `job_id`, or a page of jobs (newest first), optionally by status."""
    if job_id is not None:
        return await jobs.query(job_id)
    found, total = await jobs.page(status, limit=limit, offset=offset)
    return JobList(jobs=found, total=total, limit=limit, offset=offset)


@router.get("/progress/{job_id}", response_model=JobProgress)
async def read_progress(job_id: str, jobs: JobsDep) -> JobProgress:
    """Percentage, phase, bytes done and total, rate and ETA, in one call."""
    return await jobs.progress(job_id)


@router.get("/eta/{job_id}", response_model=JobEta)
async def read_eta(job_id: str, jobs: JobsDep) -> JobEta:
    """Time left and the expected completion time."""
    return await jobs.eta(job_id)


@router.get("/logs/{job_id}", response_model=JobLogs, responses={200: {"content": {
    "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/LogLine"}}},
    "description": "the logs; with follow=true one LogLine per line (NDJSON)"}})
async def read_logs(job_id: str, jobs: JobsDep, follow: bool = False):  # type: ignore[no-untyped-def]
    """The job's Prefect logs; with `follow=true`, streamed (NDJSON) until the job ends."""
    run = await jobs.run(job_id)
    if not follow:
        info = jobs.info(run)
        return JobLogs(job_id=info.job_id, status=info.status, logs=await jobs.logs(job_id))

    async def lines() -> AsyncIterator[str]:
        async for line in jobs.follow_logs(job_id):
            yield line.model_dump_json() + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/retry", response_model=JobAction)
async def retry_job(body: JobRef, jobs: JobsDep) -> JobAction:
    """Run a failed or cancelled job again, skipping the steps that had finished."""
    status = await jobs.retry(body.job_id)
    return JobAction(job_id=body.job_id, status=status,
                     message="scheduled again; finished steps will be skipped")


@router.post("/cancel", response_model=JobAction)
async def cancel_job(body: JobRef, jobs: JobsDep) -> JobAction:
    """Stop a job: a pending one never runs; a running one has its processes killed and
    its partial files removed."""
    status, message = await jobs.cancel(body.job_id)
    return JobAction(job_id=body.job_id, status=status, message=message)


@router.post("/test-boot", response_model=JobAction)
async def test_boot(body: JobRef, jobs: JobsDep) -> JobAction:
    """Convert and boot an overlay of a warm job's copy as it is now, while the source
    keeps running; the result lands in the job's `result.warm.test_boots` (and its logs),
    the copy is untouched."""
    status, message = await jobs.test_boot(body.job_id)
    return JobAction(job_id=body.job_id, status=status, message=message)


@router.post("/rollback", response_model=JobAction)
async def rollback(body: RollbackRequest, jobs: JobsDep, settings: SettingsDep) -> JobAction:
    """Undo a warm job's cutover: its domain undefined, its disks kept (or removed), the
    source powered on again if the cutover stopped it; recorded on the job."""
    run, result = await jobs.rollback_target(body.job_id)
    job = JobDefinition.model_validate(run.parameters["job"])
    summary = await run_in_threadpool(roll_back, job, MigrationResult.model_validate(result),
                                      settings, remove_disks=body.remove_disks)
    await jobs.record_rollback(run, summary)
    return JobAction(job_id=body.job_id, status="rolled back", message=summary)


@router.post("/cutover", response_model=JobAction)
async def cut_over(body: CutoverRequest, jobs: JobsDep) -> JobAction:
    """Cut a warm migration over: now, or at `at` (a time in the past means now). The
    source is stopped, the last changes copied, the domain defined."""
    status, message = await jobs.cutover(body.job_id, at=body.at)
    return JobAction(job_id=body.job_id, status=status, message=message)
