"""Webhooks: subscribe a URL to job, schedule and backup events."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from api.deps import ApiKeyDep, DispatcherDep, SettingsDep, WebhooksDep
from api.events import EVENT_TYPES
from api.schemas import Body
from api.webhooks import check_url

router = APIRouter(prefix="/webhooks", tags=["webhooks"], dependencies=[ApiKeyDep])


class WebhookCreate(Body):
    """The seed's POST /webhooks/configure body."""

    url: str = Field(min_length=1, examples=["https://monitoring.example.com/hypersdk"])
    events: list[str] = Field(default_factory=lambda: ["job.completed", "job.failed"],
                              examples=[list(EVENT_TYPES[:3])])
    headers: dict[str, str] = Field(default_factory=dict)
    secret: str | None = Field(default=None, min_length=16,
                               description="HMAC key; generated (and shown once) if omitted")


@router.post("/configure")
async def configure_webhook(body: WebhookCreate, store: WebhooksDep,
                            settings: SettingsDep) -> dict[str, Any]:
    """Subscribe a URL. The response carries the signing secret; listings never do."""
    await asyncio.to_thread(check_url, body.url, settings.daemon.webhook_allowed_networks)
    return await asyncio.to_thread(lambda: store.add(url=body.url, events=body.events,
                                                     headers=body.headers, secret=body.secret))


@router.get("")
async def list_webhooks(store: WebhooksDep) -> dict[str, Any]:
    return {"webhooks": await asyncio.to_thread(store.subscriptions)}


@router.delete("/{webhook_id}")
async def delete_webhook(webhook_id: str, store: WebhooksDep) -> dict[str, str]:
    await asyncio.to_thread(store.delete, webhook_id)
    return {"id": webhook_id, "status": "deleted"}


@router.get("/deliveries")
async def list_deliveries(
    store: WebhooksDep,
    webhook_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The delivery log, newest first: status, attempts, last error, response status."""
    return {"deliveries": await asyncio.to_thread(store.deliveries, webhook_id, limit)}


@router.post("/{webhook_id}/test")
async def test_webhook(webhook_id: str, store: WebhooksDep,
                       dispatcher: DispatcherDep) -> dict[str, Any]:
    """Queue a `webhook.test` delivery to this webhook and report its first attempt."""
    await asyncio.to_thread(store.get, webhook_id)
    event_id = f"test-{time.time_ns()}"
    test_event = {"type": "test", "event": "webhook.test", "event_id": event_id,
                  "timestamp": time.time(), "job_id": None, "status": "test"}
    await asyncio.to_thread(lambda: store.enqueue(test_event, webhook_id=webhook_id))
    dispatcher.wake.set()
    deadline = time.monotonic() + 15
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [d for d in await asyncio.to_thread(store.deliveries, webhook_id, 20)
                if d["event_id"] == event_id]
        if rows and rows[0]["attempts"] > 0:
            return rows[0]
        await asyncio.sleep(0.1)
    return rows[0] if rows else {"event_id": event_id, "status": "pending"}
