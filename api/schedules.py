"""Schedules are Prefect deployment schedules: a cron (with its timezone) on a served
deployment, carrying the run's parameters, named by its slug. Job schedules live on the
`migrate-vm` deployment (parameter `job`), backup policies on `backup-policy` (parameter
`policy`); both appear in the Prefect UI under their deployment, and a schedule made there
shows here."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.objects import DeploymentSchedule
from prefect.client.schemas.schedules import CronSchedule
from prefect.server.schemas.schedules import CronSchedule as CronDates
from pydantic import ValidationError

from api.schemas import JobSubmitted
from core.errors import Conflict, InvalidRequest, JobNotFound
from core.models import JobStatus


def cron_schedule(cron: str, timezone: str | None) -> CronSchedule:
    """A validated cron schedule; a clear 422 for a bad expression or timezone."""
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise InvalidRequest(f"invalid schedule {cron!r} ({timezone or 'UTC'}): "
                             f"{reasons}") from None


async def next_runs(schedule: Any, count: int = 5) -> list[datetime]:
    if not isinstance(schedule, CronSchedule):
        return []
    dates = await CronDates(cron=schedule.cron, timezone=schedule.timezone,
                            day_or=schedule.day_or).get_dates(n=count)
    return list(dates)


class ScheduleBook:
    """The schedules of one flow's deployment."""

    def __init__(self, client: PrefectClient, *, flow: str, deployment: str,
                 parameter: str) -> None:
        self.client = client
        self.flow = flow
        self.deployment_name = f"{flow}/{deployment}"
        self.parameter = parameter
        self._id: UUID | None = None

    async def deployment_id(self) -> UUID:
        if self._id is None:
            self._id = (await self.client.read_deployment_by_name(self.deployment_name)).id
        return self._id

    async def all(self) -> list[DeploymentSchedule]:
        return list(await self.client.read_deployment_schedules(await self.deployment_id()))

    async def get(self, name: str) -> DeploymentSchedule:
        """By name (slug) or by the schedule's id (for schedules made without a slug)."""
        for schedule in await self.all():
            if schedule.slug == name or str(schedule.id) == name:
                return schedule
        raise JobNotFound(f"no {self.kind} named {name!r}")

    @property
    def kind(self) -> str:
        return "backup policy" if self.parameter == "policy" else "schedule"

    async def create(self, name: str, cron: CronSchedule, parameters: dict[str, Any], *,
                     active: bool = True) -> DeploymentSchedule:
        if any(s.slug == name for s in await self.all()):
            raise Conflict(f"a {self.kind} named {name!r} exists; update or delete it")
        [created] = await self.client.create_deployment_schedules(
            await self.deployment_id(),
            [DeploymentScheduleCreate(schedule=cron, active=active, slug=name,
                                      parameters={self.parameter: parameters})])
        return created

    async def update(self, name: str, *, cron: CronSchedule | None = None,
                     parameters: dict[str, Any] | None = None,
                     active: bool | None = None) -> DeploymentSchedule:
        current = await self.get(name)
        await self.client.update_deployment_schedule(
            await self.deployment_id(), current.id, active=active, schedule=cron,
            parameters={self.parameter: parameters} if parameters is not None else None)
        return await self.get(name)

    async def delete(self, name: str) -> None:
        current = await self.get(name)
        await self.client.delete_deployment_schedule(await self.deployment_id(), current.id)

    async def trigger(self, name: str, *, tags: list[str]) -> JobSubmitted:
        """Run the schedule's job now, outside its cron."""
        current = await self.get(name)
        if not current.parameters.get(self.parameter):
            raise InvalidRequest(f"{self.kind} {name!r} carries no {self.parameter} to run")
        job = current.parameters[self.parameter]
        facts = ([f"vm:{job.get('vm_identifier')}", f"provider:{job.get('provider')}"]
                 if self.parameter == "job" else [])
        run = await self.client.create_flow_run_from_deployment(
            await self.deployment_id(), parameters=current.parameters,
            tags=["hypersdk", f"{self.parameter}:{current.slug or current.id}", *facts, *tags])
        return JobSubmitted(job_id=str(run.id), status=JobStatus.PENDING,
                            created_at=run.created or datetime.now().astimezone())
