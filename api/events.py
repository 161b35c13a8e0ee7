"""Job events for the websocket and webhooks, driven by Prefect's event stream.

One subscription per daemon to Prefect's events (flow-run state changes, and the
`hypersdk.job.progress` events tasks emit) becomes `JobEvent`s handed to every listener:
each websocket client's queue and the webhook outbox. Nothing polls Prefect per client."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
    "Paused": "job.waiting",  # a warm job between its sync rounds, until its cutover
}
TERMINAL = ("job.completed", "job.failed", "job.cancelled")
_STATUS = {"job.created": "pending", "job.started": "running", "job.waiting": "waiting",
           "job.completed": "completed",
           "job.failed": "failed", "job.cancelled": "cancelled"}
EVENT_TYPES = ("job.created", "job.started", "job.progress", "job.waiting", "job.completed",
               "job.failed",
               "job.cancelled", "schedule.triggered", "backup.completed", "backup.failed")

JobEvent = dict[str, Any]
Listener = Callable[[JobEvent], Awaitable[None]]


def _flow_name(event: Event) -> str | None:
    flow = event.resource_in_role.get("flow")
    return flow.get("prefect.resource.name") if flow else None


def _run_id(event: Event) -> str | None:
    resource = event.resource.id
    return resource.rpartition(".")[2] if resource.startswith("prefect.flow-run.") else None


def _facts_from_tags(event: Event) -> dict[str, Any] | None:
    """A job's facts from the tags hypersdk gives the runs it creates (`vm:`,
    `provider:`, `policy:`), which Prefect's events carry: no API call needed. Runs made
    by Prefect's scheduler lack them."""
    tags = [r.id.removeprefix("prefect.tag.") for r in event.related if r.role == "tag"]
    if "hypersdk" not in tags:
        return None

    def tagged(prefix: str) -> str | None:
        return next((t.removeprefix(prefix) for t in tags if t.startswith(prefix)), None)

    vm, provider, policy = tagged("vm:"), tagged("provider:"), tagged("policy:")
    if not (vm or policy):
        return None
    return {"vm": vm, "provider": provider, "auto_scheduled": False, "deployment_id": None,
            "policy": policy}


class EventHub:
    """Turns Prefect events into job events and fans them out to listeners."""

    def __init__(self, jobs: Jobs, *, since: datetime | None = None) -> None:
        self.jobs = jobs
        self.listeners: set[Listener] = set()
        self.detailed: set[Listener] = set()
        self.clients = 0  # websocket clients connected
        self.start = since  # where the first subscriptions replay from
        self.last_seen: datetime | None = None
        self._last_progress: dict[str, float] = {}
        self._run_facts: dict[str, dict[str, Any]] = {}
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._seen: dict[Any, None] = {}  # recent event ids, oldest first

    def add(self, listener: Listener, *, detailed: bool = False) -> None:
        """`detailed` listeners get a finished job's event with its result, at the cost
        of waiting for Prefect to answer; the others get every event at once."""
        self.listeners.add(listener)
        if detailed:
            self.detailed.add(listener)

    def discard(self, listener: Listener) -> None:
        self.listeners.discard(listener)
        self.detailed.discard(listener)

    async def run(self) -> None:
        """Follow Prefect's event stream until cancelled, reconnecting after errors.

        Prefect backfills a new subscription from its database, but stores events a few
        seconds after streaming them: events of the last moments before a (re)start are in
        neither. So the first subscription is renewed once after CATCH_UP seconds, with
        the same starting point; events seen twice are dropped by id."""
        event_filter = EventFilter(event=EventNameFilter(  # type: ignore[call-arg]
            prefix=["prefect.flow-run.", PROGRESS_EVENT]))
        caught_up = False  # the first subscription has run its CATCH_UP seconds
        renewed = False  # ... and has been renewed from the same starting point
        pause = 1.0
        while True:
            # replay what happened while the daemon was down: Prefect backfills a new
            # subscription with the events since this time
            if caught_up and not renewed:
                since = self.start
            elif self.last_seen is not None:
                since = self.last_seen - timedelta(seconds=1)
            else:
                since = self.start
            try:
                subscriber = get_events_subscriber(filter=event_filter,
                                                   reconnection_attempts=1000)
                if since is not None:
                    subscriber._backfill_since = since  # type: ignore[attr-defined,assignment]
                async with subscriber:
                    pause = 1.0
                    if not caught_up:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(CATCH_UP):
                                async for event in subscriber:
                                    await self.handle(event)
                        caught_up = True
                        continue
                    renewed = True
                    async for event in subscriber:
                        await self.handle(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep following whatever happens
                log.warning("event stream interrupted (%s); reconnecting in %.0f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)  # a Prefect server that is down is not hammered

    async def handle(self, event: Event) -> None:
        if event.id in self._seen:
            return
        self._seen[event.id] = None
        if len(self._seen) > SEEN_IDS:
            del self._seen[next(iter(self._seen))]
        if self.last_seen is None or event.occurred > self.last_seen:
            self.last_seen = event.occurred
        run_id = _run_id(event)
        if run_id is None:
            return
        # runs are handled side by side (a slow Prefect answer about one run must not delay
        # the others), each run's events in order
        previous = self._chains.get(run_id)
        task = asyncio.create_task(self._in_order(previous, event, run_id))
        self._chains[run_id] = task
        task.add_done_callback(lambda done: self._chains.pop(run_id, None)
                               if self._chains.get(run_id) is done else None)

    async def _in_order(self, previous: asyncio.Task[None] | None, event: Event,
                        run_id: str) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(previous)
        try:
            await self._process(event, run_id)
        except Exception as exc:  # noqa: BLE001 - one event must not stop the stream
            log.warning("event %s not handled: %s", event.event, exc)

    async def _process(self, event: Event, run_id: str) -> None:
        if event.event == PROGRESS_EVENT:
            message = self._progress(event, run_id)
            if message:
                await self._publish(message)
            return
        flow = _flow_name(event)
        name = _STATE_EVENTS.get(event.event.rpartition(".")[2])
        if flow not in WATCHED_FLOWS or name is None:
            return
        facts = self._run_facts.get(run_id) or _facts_from_tags(event) or \
            await self._facts(run_id)
        self._run_facts.setdefault(run_id, facts or {})
        if facts is None:
            return
        messages = self._state(event, run_id, flow, name, facts)
        for message in messages:
            await self._publish(message, detailed=False)
        if name in TERMINAL:
            # the result (or the full error) takes API calls: only listeners that asked
            # for details (webhooks) wait for it; websocket clients have been told already
            try:
                info = await self.jobs.query(run_id)
            except JobNotFound:
                info = None
            if info is not None:
                for message in messages:
                    message.update(result=info.result, error=info.error or message["error"])
            self._run_facts.pop(run_id, None)
        for message in messages:
            await self._publish(message, detailed=True)

    async def _publish(self, message: JobEvent, *, detailed: bool | None = None) -> None:
        """To every listener (detailed None), or to those that did (not) ask for details."""
        # encoded once for every websocket client (listeners ignore keys starting with _)
        text = json.dumps({k: v for k, v in message.items() if not k.startswith("_")},
                          default=str)
        for listener in list(self.listeners):
            if detailed is not None and (listener in self.detailed) != detailed:
                continue
            try:
                await listener({**message, "_json": text})
            except Exception as exc:  # noqa: BLE001 - one listener must not stop others
                log.warning("event listener failed: %s", exc)

    def _progress(self, event: Event, run_id: str) -> JobEvent | None:
        now = time.monotonic()
        if now - self._last_progress.get(run_id, 0.0) < PROGRESS_INTERVAL:
            return None
        self._last_progress[run_id] = now
        payload = event.payload
        facts = self._run_facts.get(run_id, {})
        return {
            "type": "job", "event": "job.progress", "event_id": str(event.id),
            "timestamp": event.occurred.isoformat(), "job_id": run_id,
            "status": "running", "phase": payload.get("phase"),
            "progress": payload.get("percentage"), "bytes_done": payload.get("bytes_done"),
            "bytes_total": payload.get("bytes_total"), "rate_bps": payload.get("rate_bps"),
            "vm": facts.get("vm") or payload.get("vm"), "provider": facts.get("provider"),
        }

    async def _facts(self, run_id: str) -> dict[str, Any] | None:
        """What every event of a run repeats (VM, provider, schedule, policy): read from
        Prefect once per run, at its first event."""
        if run_id not in self._run_facts:
            try:
                run = await self.jobs.run(run_id)
            except JobNotFound:
                return None
            info = self.jobs.info(run)
            if len(self._run_facts) > SEEN_IDS:
                del self._run_facts[next(iter(self._run_facts))]
            self._run_facts[run_id] = {
                "vm": info.vm_identifier, "provider": info.provider,
                "auto_scheduled": bool(run.auto_scheduled),
                "deployment_id": str(run.deployment_id) if run.deployment_id else None,
                "policy": (run.parameters.get("policy") or {}).get("name"),
            }
        return self._run_facts[run_id]

    @staticmethod
    def _state(event: Event, run_id: str, flow: str, name: str,
               facts: dict[str, Any]) -> list[JobEvent]:
        """The job event for a flow-run state change, from the event alone (plus facts),
        and the schedule or backup event it also is."""
        state = event.payload.get("validated_state") or {}
        status = _STATUS[name]
        message: JobEvent = {
            "type": "job", "event": name, "event_id": str(event.id),
            "timestamp": event.occurred.isoformat(), "job_id": run_id, "flow": flow,
            "status": status, "phase": None,
            "progress": 100.0 if status == "completed" else None,
            "vm": facts["vm"], "provider": facts["provider"], "result": None,
            "error": state.get("message") if status in ("failed", "cancelled") else None,
        }
        if flow == BACKUP_FLOW and name in ("job.completed", "job.failed"):
            message.update(type="backup", policy=facts["policy"],
                           event="backup.completed" if name == "job.completed" else
                           "backup.failed")
        messages = [message]
        if name == "job.started" and facts["auto_scheduled"]:
            messages.insert(0, {**message, "type": "schedule", "event": "schedule.triggered",
                                "event_id": f"{event.id}-schedule",
                                "deployment_id": facts["deployment_id"]})
        return messages


async def stop(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
