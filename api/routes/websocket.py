"""/websocket: a snapshot of active jobs, then every job, schedule and backup event as it
happens. Send `{"subscribe": "<job id>"}` to follow one job (`{"unsubscribe": ...}` to
stop); `?job_id=` does the same at connect. With `?results=true` a finished job's event
carries its result (domain, disks; or the full error), a few milliseconds later than it
would without. A client that cannot keep up is dropped (close code 1013) rather than
slowing anyone else."""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.deps import key_matches
from api.events import EventHub, JobEvent
from api.jobs import Jobs

router = APIRouter(tags=["websocket"])
QUEUE_SIZE = 256  # events a client may lag behind before it is dropped
SEND_TIMEOUT = 5.0


def _authorized(websocket: WebSocket, expected: str | None) -> bool:
    if not expected:
        return True
    header = websocket.headers.get("authorization", "")
    given = (websocket.headers.get("x-api-key")
             or (header[7:] if header.lower().startswith("bearer ") else None)
             or websocket.query_params.get("token"))
    return key_matches(given, expected)


async def _snapshot(jobs: Jobs) -> list[dict[str, object]]:
    return [{"job_id": info.job_id, "status": info.status.value, "vm": info.vm_identifier,
             "provider": info.provider, "phase": progress.phase,
             "progress": progress.percentage}
            for info, progress in await jobs.active()]


@router.websocket("/websocket")
async def websocket_updates(websocket: WebSocket) -> None:
    if not _authorized(websocket, websocket.app.state.settings.api_key):
        await websocket.close(code=1008, reason="missing or invalid API key")
        return
    await websocket.accept()
    hub: EventHub = websocket.app.state.hub
    queue: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize=QUEUE_SIZE)
    follow: set[str] = set()
    if websocket.query_params.get("job_id"):
        follow.add(websocket.query_params["job_id"])
    overflow = asyncio.Event()

    async def listener(message: JobEvent) -> None:
        if follow and message.get("job_id") not in follow:
            return
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:
            overflow.set()

    results = websocket.query_params.get("results", "").lower() in ("1", "true", "yes")
    hub.add(listener, detailed=results)
    hub.clients += 1
    try:
        await websocket.send_json({"type": "snapshot",
                                   "jobs": await _snapshot(websocket.app.state.jobs)})
        reader = asyncio.create_task(_read(websocket, follow, queue, overflow))
        try:
            while not reader.done():
                getter = asyncio.create_task(queue.get())
                dropped = asyncio.create_task(overflow.wait())
                done, _ = await asyncio.wait({getter, dropped, reader},
                                             return_when=asyncio.FIRST_COMPLETED)
                for pending in (getter, dropped):
                    if pending not in done:
                        pending.cancel()
                if dropped in done:
                    with contextlib.suppress(Exception):  # its socket may be full as well
                        await asyncio.wait_for(websocket.close(
                            code=1013, reason="client too slow; reconnect"), SEND_TIMEOUT)
                    return
                if getter in done:
                    message = getter.result()
                    text = message.get("_json") or json.dumps(message, default=str)
                    await asyncio.wait_for(websocket.send_text(text), timeout=SEND_TIMEOUT)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
    except (WebSocketDisconnect, TimeoutError, RuntimeError):
        pass
    finally:
        hub.discard(listener)
        hub.clients -= 1


async def _read(websocket: WebSocket, follow: set[str], queue: asyncio.Queue[JobEvent],
                overflow: asyncio.Event) -> None:
    """Subscriptions from the client, until it goes away."""
    while True:
        try:
            message = await websocket.receive_json()
        except (WebSocketDisconnect, RuntimeError):
            return
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        if message.get("subscribe"):
            follow.add(str(message["subscribe"]))
        if message.get("unsubscribe"):
            follow.discard(str(message["unsubscribe"]))
        if message.get("type") == "ping":
            # answered by the one task that sends, in order with the events; a client that
            # asks without reading the answers is as slow as one that does not read events
            try:
                queue.put_nowait({"type": "pong"})
            except asyncio.QueueFull:
                overflow.set()
