"""Health and capabilities."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, JobsDep, SettingsDep
from api.schemas import Health
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


@router.get("/capabilities", dependencies=[ApiKeyDep])
async def read_capabilities(settings: SettingsDep) -> dict:
    """Providers configured and usable, export methods, formats, tool versions."""
    providers: dict[str, dict] = {}
    for name in settings.providers.enabled():
        try:
            get_provider(name, settings).close()
            providers[name] = {"configured": True, "usable": True}
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            providers[name] = {"configured": True, "usable": False, "reason": str(exc)}
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


