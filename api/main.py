"""The FastAPI app: routers and error handlers, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prefect.client.orchestration import get_client

from api.errors import install_error_handlers
from api.jobs import Jobs
from api.routes import convert, health, jobs, vms
from core.config import Config
from hyper2kvm import __version__

DEPLOYMENT = "hypervisord"  # every flow's deployment has this name


def create_app(settings: Config, *, deployment: str = DEPLOYMENT) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with get_client() as client:
            app.state.jobs = Jobs(client, deployment=deployment)
            yield

    app = FastAPI(
        title="hypervisord",
        version=__version__,
        description="Move VMs to KVM: jobs are Prefect flow runs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    for module in (health, vms, jobs, convert):
        app.include_router(module.router)
    return app
