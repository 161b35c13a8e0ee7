"""Job events for the websocket and webhooks, driven by Prefect's event stream.

One subscription per daemon to Prefect's events (flow-run state changes, and the
`hypersdk.job.progress` events tasks emit) becomes `JobEvent`s handed to every listener:
each websocket client's queue and the webhook outbox. Nothing polls Prefect per client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.schemas.events import Event

from api.jobs import FLOWS, Jobs
from core.errors import JobNotFound
from tasks.progress import PROGRESS_EVENT

log = logging.getLogger("hypervisord.events")
BACKUP_FLOW = "backup-policy"
WATCHED_FLOWS = (*FLOWS, BACKUP_FLOW)
PROGRESS_INTERVAL = 0.5  # at most 2 progress events per job per second
CATCH_UP = 12.0  # seconds; longer than Prefect's event persister takes to store events
SEEN_IDS = 20000
_STATE_EVENTS = {
    "Scheduled": "job.created", "Pending": None, "Running": "job.started",
    "Completed": "job.completed", "Failed": "job.failed", "Crashed": "job.failed",
    "Cancelled": "job.cancelled",
}
EVENT_TYPES = ("job.created", "job.started", "job.progress", "job.completed", "job.failed",
               "job.cancelled", "schedule.triggered", "backup.completed", "backup.failed")

JobEvent = dict[str, Any]
Listener = Callable[[JobEvent], Awaitable[None]]


def _flow_name(event: Event) -> str | None:
    flow = event.resource_in_role.get("flow")
    return flow.get("prefect.resource.name") if flow else None


def _run_id(event: Event) -> str | None:
    resource = event.resource.id
    return resource.rpartition(".")[2] if resource.startswith("prefect.flow-run.") else None


class EventHub:
    """Turns Prefect events into job events and fans them out to listeners."""

    def __init__(self, jobs: Jobs, *, since: datetime | None = None) -> None:
        self.jobs = jobs
        self.listeners: set[Listener] = set()
        self.since = since
        self.last_seen: datetime | None = None
        self._last_progress: dict[str, float] = {}
        self._flows: dict[str, str | None] = {}  # run id → flow name, for progress events
        self._seen: dict[Any, None] = {}  # recent event ids, oldest first
        self.connected = asyncio.Event()

    def add(self, listener: Listener) -> None:
        self.listeners.add(listener)

    def discard(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    async def run(self) -> None:
        """Follow Prefect's event stream until cancelled, reconnecting after errors.

        Prefect backfills a new subscription from its database, but stores events a few
        seconds after streaming them: events of the last moments before a (re)start are in
        neither. So the first subscription is renewed once after CATCH_UP seconds, with
        the same starting point; events seen twice are dropped by id."""
        event_filter = EventFilter(event=EventNameFilter(  # type: ignore[call-arg]
            prefix=["prefect.flow-run.", PROGRESS_EVENT]))
        start = self.since
        catching_up = True
        while True:
            try:
                subscriber = get_events_subscriber(filter=event_filter,
                                                   reconnection_attempts=1000)
                if self.since is not None:
                    # replay what happened while the daemon was down (Prefect backfills
                    # events from this time on)
                    subscriber._backfill_since = self.since  # type: ignore[attr-defined,assignment]
                async with subscriber:
                    self.connected.set()
                    if catching_up:
                        catching_up = False
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(CATCH_UP):
                                async for event in subscriber:
                                    await self.handle(event)
                        self.since = start
                        continue
                    async for event in subscriber:
                        await self.handle(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep following whatever happens
                log.warning("event stream interrupted (%s); reconnecting", exc)
                await asyncio.sleep(1)

    async def handle(self, event: Event) -> None:
        if event.id in self._seen:
            return
        self._seen[event.id] = None
        if len(self._seen) > SEEN_IDS:
            del self._seen[next(iter(self._seen))]
        if self.last_seen is None or event.occurred > self.last_seen:
            self.last_seen = event.occurred
        self.since = self.last_seen - timedelta(seconds=1)
        run_id = _run_id(event)
        if run_id is None:
            return
        if event.event == PROGRESS_EVENT:
            message = self._progress(event, run_id)
        else:
            flow = _flow_name(event)
            self._flows[run_id] = flow
            message = await self._state(event, run_id, flow) if flow in WATCHED_FLOWS else None
        if message:
            for extra in message.pop("_also", []):
                await self._publish(extra)
            await self._publish(message)

    async def _publish(self, message: JobEvent) -> None:
        for listener in list(self.listeners):
            try:
                await listener(message)
            except Exception as exc:  # noqa: BLE001 - one listener must not stop others
                log.warning("event listener failed: %s", exc)

    def _progress(self, event: Event, run_id: str) -> JobEvent | None:
        now = time.monotonic()
        if now - self._last_progress.get(run_id, 0.0) < PROGRESS_INTERVAL:
            return None
        self._last_progress[run_id] = now
        payload = event.payload
        return {
            "type": "job", "event": "job.progress", "event_id": str(event.id),
            "timestamp": event.occurred.isoformat(), "job_id": run_id,
            "status": "running", "phase": payload.get("phase"),
            "progress": payload.get("percentage"), "bytes_done": payload.get("bytes_done"),
            "bytes_total": payload.get("bytes_total"), "vm": payload.get("vm"),
        }

    async def _state(self, event: Event, run_id: str, flow: str | None) -> JobEvent | None:
        state = event.event.rpartition(".")[2]
        name = _STATE_EVENTS.get(state)
        if name is None:
            return None
        try:
            run = await self.jobs.run(run_id)
            info = await self.jobs.query(run_id)
        except JobNotFound:
            return None
        message: JobEvent = {
            "type": "job", "event": name, "event_id": str(event.id),
            "timestamp": event.occurred.isoformat(), "job_id": run_id, "flow": flow,
            "status": info.status.value, "phase": None,
            "progress": 100.0 if info.status.value == "completed" else None,
            "vm": info.vm_identifier, "provider": info.provider,
            "result": info.result, "error": info.error,
        }
        also: list[JobEvent] = []
        if flow == BACKUP_FLOW and name in ("job.completed", "job.failed"):
            policy = (run.parameters.get("policy") or {}).get("name")
            message = {**message, "type": "backup", "policy": policy,
                       "event": "backup.completed" if name == "job.completed" else
                       "backup.failed"}
        if name == "job.started" and run.auto_scheduled:
            also.append({**message, "type": "schedule", "event": "schedule.triggered",
                         "event_id": f"{event.id}-schedule",
                         "deployment_id": str(run.deployment_id)})
        message["_also"] = also
        return message


async def stop(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
