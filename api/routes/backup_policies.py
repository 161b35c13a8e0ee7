"""Backup policies: cron schedules on the backup-policy deployment, each carrying its
policy (filter, retention, export options)."""

from __future__ import annotations

import shutil
from typing import Annotated

from fastapi import APIRouter, Query
from prefect.client.schemas.objects import DeploymentSchedule
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, PoliciesDep, SettingsDep
from api.schedules import cron_schedule, next_runs
from api.schemas import BackupPolicyInfo, BackupPolicyList, JobSubmitted
from core.config import Config
from core.errors import InvalidRequest
from core.models import BackupPolicy
from core.paths import confine
from providers import get_provider

router = APIRouter(prefix="/backup-policies", tags=["backup-policies"],
                   dependencies=[ApiKeyDep])


def check_provider(policy: BackupPolicy, settings: Config) -> None:
    with get_provider(policy.provider, settings):
        pass


async def describe(schedule: DeploymentSchedule) -> BackupPolicyInfo:
    return BackupPolicyInfo(
        name=schedule.slug or str(schedule.id), id=str(schedule.id), active=schedule.active,
        policy=schedule.parameters.get("policy"),
        next_runs=await next_runs(schedule.schedule) if schedule.active else [],
        created_at=schedule.created, updated_at=schedule.updated)


@router.post("/create", response_model=BackupPolicyInfo)
async def create_policy(policy: BackupPolicy, book: PoliciesDep,
                        settings: SettingsDep) -> BackupPolicyInfo:
    """A backup policy: its schedule runs the backup-policy flow with it."""
    cron = cron_schedule(policy.schedule, policy.timezone)
    await run_in_threadpool(check_provider, policy, settings)
    return await describe(await book.create(policy.name, cron, policy.model_dump(mode="json")))


@router.get("", response_model=BackupPolicyList)
async def list_policies(book: PoliciesDep) -> BackupPolicyList:
    return BackupPolicyList(policies=[await describe(s) for s in await book.all()])


@router.get("/{name}", response_model=BackupPolicyInfo)
async def read_policy(name: str, book: PoliciesDep) -> BackupPolicyInfo:
    return await describe(await book.get(name))


@router.put("/{name}", response_model=BackupPolicyInfo)
async def update_policy(name: str, policy: BackupPolicy, book: PoliciesDep,
                        settings: SettingsDep) -> BackupPolicyInfo:
    """Replace the policy (its name stays)."""
    if policy.name != name:
        raise InvalidRequest(f"the body names policy {policy.name!r}, the path {name!r}")
    cron = cron_schedule(policy.schedule, policy.timezone)
    await run_in_threadpool(check_provider, policy, settings)
    return await describe(await book.update(name, cron=cron,
                                            parameters=policy.model_dump(mode="json")))


@router.delete("/{name}")
async def delete_policy(
    name: str, book: PoliciesDep, settings: SettingsDep,
    delete_backups: Annotated[bool, Query(description="also remove its backups")] = False,
) -> dict[str, str | bool]:
    """Remove the policy; its backups stay unless `delete_backups=true`."""
    current = await book.get(name)
    await book.delete(name)
    removed = False
    if delete_backups:
        folder = confine(settings.export.base_path / (current.slug or name),
                         settings.export.base_path)
        if folder.is_dir():
            await run_in_threadpool(shutil.rmtree, folder)
            removed = True
    return {"name": name, "status": "deleted", "backups_deleted": removed}


@router.post("/{name}/run", response_model=JobSubmitted)
async def run_policy(name: str, book: PoliciesDep) -> JobSubmitted:
    """Run the policy now; returns the backup run's job id."""
    return await book.trigger(name, tags=["backup", "triggered"])
