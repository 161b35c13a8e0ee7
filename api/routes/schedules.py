"""Schedules: cron schedules on the migrate-vm deployment, each carrying its job."""

from __future__ import annotations

from fastapi import APIRouter
from prefect.client.schemas.objects import DeploymentSchedule
from prefect.client.schemas.schedules import CronSchedule
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, SchedulesDep, SettingsDep
from api.routes.jobs import validate_job
from api.schedules import cron_schedule, next_runs
from api.schemas import (
    JobSubmitted,
    ScheduleCreate,
    ScheduleInfo,
    ScheduleList,
    ScheduleUpdate,
)
from core.config import Config
from core.errors import InvalidRequest, NotFound
from core.models import JobDefinition

router = APIRouter(prefix="/schedules", tags=["schedules"], dependencies=[ApiKeyDep])


async def check_job(job: JobDefinition, settings: Config) -> None:
    """The job as /jobs/submit checks it; a VM that does not exist makes the schedule
    invalid (422), it is not a missing resource of this request."""
    try:
        await run_in_threadpool(validate_job, job, settings)
    except NotFound as exc:
        raise InvalidRequest(f"job_definition: {exc}") from None


async def describe(schedule: DeploymentSchedule, parameter: str) -> ScheduleInfo:
    cron = schedule.schedule if isinstance(schedule.schedule, CronSchedule) else None
    return ScheduleInfo(
        name=schedule.slug or str(schedule.id), id=str(schedule.id),
        cron=cron.cron if cron else None, timezone=cron.timezone if cron else None,
        active=schedule.active, job_definition=schedule.parameters.get(parameter),
        next_runs=await next_runs(schedule.schedule) if schedule.active else [],
        created_at=schedule.created, updated_at=schedule.updated,
    )


@router.post("/create", response_model=ScheduleInfo)
async def create_schedule(body: ScheduleCreate, book: SchedulesDep,
                          settings: SettingsDep) -> ScheduleInfo:
    """A cron schedule for a job; the job is validated as /jobs/submit would."""
    cron = cron_schedule(body.cron, body.timezone)
    await check_job(body.job_definition, settings)
    created = await book.create(body.name, cron, body.job_definition.model_dump(mode="json"),
                                active=body.active)
    return await describe(created, "job")


@router.get("", response_model=ScheduleList)
async def list_schedules(book: SchedulesDep) -> ScheduleList:
    return ScheduleList(schedules=[await describe(s, "job") for s in await book.all()])


@router.get("/{name}", response_model=ScheduleInfo)
async def read_schedule(name: str, book: SchedulesDep) -> ScheduleInfo:
    return await describe(await book.get(name), "job")


@router.put("/{name}", response_model=ScheduleInfo)
async def update_schedule(name: str, body: ScheduleUpdate, book: SchedulesDep,
                          settings: SettingsDep) -> ScheduleInfo:
    current = await book.get(name)
    cron = None
    if body.cron is not None or body.timezone is not None:
        old = current.schedule if isinstance(current.schedule, CronSchedule) else None
        cron = cron_schedule(body.cron or (old.cron if old else ""),
                             body.timezone if body.timezone is not None else
                             (old.timezone if old else None))
    job: JobDefinition | None = body.job_definition
    if job is not None:
        await check_job(job, settings)
    updated = await book.update(name, cron=cron, active=body.active,
                                parameters=job.model_dump(mode="json") if job else None)
    return await describe(updated, "job")


@router.delete("/{name}")
async def delete_schedule(name: str, book: SchedulesDep) -> dict[str, str]:
    await book.delete(name)
    return {"name": name, "status": "deleted"}


@router.post("/{name}/pause", response_model=ScheduleInfo)
async def pause_schedule(name: str, book: SchedulesDep) -> ScheduleInfo:
    return await describe(await book.update(name, active=False), "job")


@router.post("/{name}/resume", response_model=ScheduleInfo)
async def resume_schedule(name: str, book: SchedulesDep) -> ScheduleInfo:
    return await describe(await book.update(name, active=True), "job")


@router.post("/{name}/trigger", response_model=JobSubmitted)
async def trigger_schedule(name: str, book: SchedulesDep) -> JobSubmitted:
    """Run the schedule's job now; returns its job id."""
    return await book.trigger(name, tags=["triggered"])
