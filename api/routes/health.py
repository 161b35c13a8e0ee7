"""Health and capabilities."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, JobsDep, SettingsDep
from api.schemas import Health
from core.config import Config
from hyper2kvm import __version__, qemu_img, registration
from providers import get_provider, known_providers

router = APIRouter(tags=["health"])
EXPORT_METHODS = ["ova", "ovf", "vmdk"]
OUTPUT_FORMATS = ["qcow2", "raw"]


@router.get("/health", response_model=Health)
async def read_health(jobs: JobsDep, request: Request) -> Health:
    """Liveness, and whether Prefect answers."""
    try:
        reachable = (await jobs.client.api_healthcheck()) is None
    except Exception:  # noqa: BLE001 - any failure means unreachable
        reachable = False
    return Health(status="healthy" if reachable else "degraded", version=__version__,
                  prefect={"reachable": reachable, "api_url": str(jobs.client.api_url)},
                  websocket_clients=request.app.state.hub.clients)


CHECK_SECONDS = 30.0  # how long a provider's check is trusted
_checked: dict[str, tuple[float, dict[str, Any]]] = {}


def provider_state(name: str, settings: Config) -> dict[str, Any]:
    """Whether the provider really answers (its check, e.g. a vSphere login), kept for
    CHECK_SECONDS so that polling /capabilities does not log in each time."""
    now = time.monotonic()
    known = _checked.get(name)
    if known and known[0] > now:
        return known[1]
    try:
        with get_provider(name, settings) as provider:
            provider.check()
        state: dict[str, Any] = {"configured": True, "usable": True}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        state = {"configured": True, "usable": False, "reason": str(exc)}
    _checked[name] = (now + CHECK_SECONDS, state)
    return state


@router.get("/capabilities", dependencies=[ApiKeyDep])
async def read_capabilities(settings: SettingsDep) -> dict:
    """Providers configured and usable (checked for real, trusted for 30 s), export
    methods, formats, tool versions."""
    names = list(settings.providers.enabled())
    states = await asyncio.gather(*(run_in_threadpool(provider_state, name, settings)
                                    for name in names))
    providers: dict[str, dict] = dict(zip(names, states, strict=True))
    for name in known_providers():
        providers.setdefault(name, {"configured": False, "usable": False})
    uri = settings.hyper2kvm.libvirt_uri
    return {
        "version": __version__,
        "providers": providers,
        "export_methods": EXPORT_METHODS,
        "formats": OUTPUT_FORMATS,
        "qemu_img": qemu_img.version(),
        "qcow2_zstd": qemu_img.supports_zstd(),
        "libvirt": {"uri": uri, "version": await run_in_threadpool(registration.version, uri)},
    }


