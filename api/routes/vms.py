"""VMs as providers see them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, MetricsDep, SettingsDep
from api.metrics import Metrics
from api.schemas import VMList, VMListRequest
from core.config import Config
from core.models import VMFilter, VMInfo
from providers import get_provider

router = APIRouter(prefix="/vms", tags=["vms"], dependencies=[ApiKeyDep])


def _list(settings: Config, metrics: Metrics, provider: str, vm_filter: VMFilter) -> VMList:
    with metrics.provider_call(provider), get_provider(provider, settings) as driver:
        vms = driver.list_vms(vm_filter)
    return VMList(provider=provider, count=len(vms), vms=vms)


def _info(settings: Config, metrics: Metrics, provider: str, identifier: str) -> VMInfo:
    with metrics.provider_call(provider), get_provider(provider, settings) as driver:
        return driver.get_vm(identifier)


@router.post("/list", response_model=VMList)
async def list_vms(body: VMListRequest, settings: SettingsDep, metrics: MetricsDep) -> VMList:
    """VMs of one provider matching the filter."""
    return await run_in_threadpool(_list, settings, metrics, body.provider, body.filter)


@router.get("/info", response_model=VMInfo)
async def read_vm(
    settings: SettingsDep,
    metrics: MetricsDep,
    identifier: Annotated[str, Query(min_length=1)],
    provider: str = "local",
) -> VMInfo:
    """One VM's hardware."""
    return await run_in_threadpool(_info, settings, metrics, provider, identifier)
