"""The FastAPI app: routers, error handlers, and what runs beside them for the app's life
(the Prefect event subscription feeding the websocket and the webhook dispatcher)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI
from prefect.client.orchestration import get_client

from api.errors import install_error_handlers
from api.events import EventHub, JobEvent, stop
from api.guard import RequestGuard
from api.jobs import Jobs
from api.metrics import Metrics
from api.routes import (
    backup_policies,
    convert,
    health,
    jobs,
    metrics,
    schedules,
    vms,
    webhooks,
    websocket,
)
from api.schedules import ScheduleBook
from api.schemas import ERROR_RESPONSES
from api.webhooks import Dispatcher, WebhookStore
from core.config import Config
from flows import DEPLOYMENT  # every flow's deployment has this name
from hyper2kvm import __version__

LAST_EVENT = "last_event_at"


def create_app(settings: Config, *, deployment: str = DEPLOYMENT) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = WebhookStore(settings.database.path)
        store.sync_config(settings)
        last = store.get_state(LAST_EVENT)
        async with get_client() as client:
            app.state.jobs = Jobs(client, deployment=deployment)
            app.state.schedules = ScheduleBook(client, flow="migrate-vm", deployment=deployment,
                                               parameter="job")
            app.state.policies = ScheduleBook(client, flow="backup-policy",
                                              deployment=deployment, parameter="policy")
            app.state.webhooks = store
            # events missed while the daemon was down are replayed from the last one seen
            app.state.hub = hub = EventHub(app.state.jobs, since=datetime.fromisoformat(last)
                                           if last else None)
            app.state.metrics = metrics = Metrics(outbox_backlog=store.backlog,
                                                  websocket_clients=lambda: hub.clients)
            app.state.dispatcher = dispatcher = Dispatcher(store, settings,
                                                           attempted=metrics.delivery)

            saved = {"at": 0.0}

            async def remember(event: JobEvent) -> None:
                # where to replay from after a restart: written at most once a second
                # (replaying a little more is harmless, events are deduplicated)
                now = asyncio.get_running_loop().time()
                if hub.last_seen is not None and now - saved["at"] >= 1.0:
                    saved["at"] = now
                    await asyncio.to_thread(store.set_state, LAST_EVENT,
                                            hub.last_seen.isoformat())

            hub.add(dispatcher.on_event, detailed=True)  # webhooks carry the result
            hub.add(app.state.jobs.on_event)  # a finished job's kept answer goes stale
            hub.add(remember)
            hub.add(metrics.on_event, detailed=True)  # step times come with the result
            tasks = [asyncio.create_task(hub.run(), name="events"),
                     asyncio.create_task(dispatcher.run(), name="webhooks")]
            try:
                yield
            finally:
                for task in tasks:
                    await stop(task)
                store.close()

    app = FastAPI(
        title="hypervisord",
        version=__version__,
        description="Move VMs to KVM: jobs are Prefect flow runs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=settings.api_key,
                       max_body_bytes=settings.daemon.max_body_bytes,
                       public=("/metrics",) if settings.daemon.metrics_public else ())
    for module in (health, vms, jobs, convert, schedules, backup_policies, webhooks, websocket,
                   metrics):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    return app
