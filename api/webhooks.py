"""Webhooks: subscriptions, an outbox and its delivery, in the daemon's SQLite database.

Every job event a webhook wants becomes one outbox row (unique per webhook and event, so
a replayed event is not queued twice). The dispatcher POSTs due rows with a delivery id
and an HMAC-SHA256 signature of the body under the webhook's secret, and on failure
retries with exponential backoff; rows survive a restart. At least once: receivers
deduplicate on `X-Hypersdk-Delivery`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from api.events import EVENT_TYPES, JobEvent
from core.config import Config
from core.errors import InvalidRequest, JobNotFound
from core.files import private_file

log = logging.getLogger("hypervisord.webhooks")
SIGNATURE_HEADER = "X-Hypersdk-Signature-256"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, events TEXT NOT NULL, headers TEXT NOT NULL,
    secret TEXT NOT NULL, source TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    delivery_id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, event TEXT NOT NULL,
    event_id TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    last_error TEXT, response_status INTEGER, created_at REAL NOT NULL,
    delivered_at REAL, UNIQUE (webhook_id, event_id));
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


def check_url(url: str, allowed: list[str]) -> None:
    """http(s) only; loopback, link-local (cloud metadata) and unspecified addresses are
    refused unless a configured network allows them."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook url {url!r}: must be http:// or https:// with a host")
    networks = [ipaddress.ip_network(n, strict=False) for n in allowed]
    host = parts.hostname
    if host.lower() in _METADATA_HOSTS:
        raise InvalidRequest(f"webhook url {url!r}: cloud metadata endpoints are refused")
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise InvalidRequest(f"webhook url {url!r}: cannot resolve {host}: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if any(address in network for network in networks):
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified \
                or address.is_multicast:
            raise InvalidRequest(
                f"webhook url {url!r}: {host} resolves to {address}, a loopback, link-local "
                "or metadata address; allow it in daemon.webhook_allowed_networks if meant")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _masked(headers: dict[str, str]) -> dict[str, str]:
    return dict.fromkeys(headers, "***")


class WebhookStore:
    """The tables; every call is short, serialized by one lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # it holds webhook secrets and header values: 0600 before SQLite opens it (SQLite
        # gives its -wal and -shm files the database's mode); older files tightened
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if not suffix or part.exists():
                private_file(part)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- subscriptions
    def add(self, *, url: str, events: list[str], headers: dict[str, str],
            secret: str | None = None, source: str = "api",
            webhook_id: str | None = None) -> dict[str, Any]:
        unknown = sorted(set(events) - set(EVENT_TYPES) - {"*"})
        if unknown or not events:
            raise InvalidRequest(f"unknown webhook event(s) {unknown or events}; known: "
                                 f"{', '.join(EVENT_TYPES)} (or '*')")
        row = {"id": webhook_id or uuid.uuid4().hex, "url": url, "events": json.dumps(events),
               "headers": json.dumps(headers), "secret": secret or secrets.token_hex(32),
               "source": source, "created_at": datetime.now(UTC).isoformat()}
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO webhooks VALUES (:id, :url, :events, :headers, "
                       ":secret, :source, :created_at)", row)
        return self._public(row) | {"secret": row["secret"]}

    @staticmethod
    def _public(row: Any) -> dict[str, Any]:
        return {"id": row["id"], "url": row["url"], "events": json.loads(row["events"]),
                "headers": _masked(json.loads(row["headers"])), "source": row["source"],
                "created_at": row["created_at"]}

    def subscriptions(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = list(self._db.execute("SELECT * FROM webhooks ORDER BY created_at"))
        return [self._public(r) for r in rows]

    def get(self, webhook_id: str) -> sqlite3.Row:
        with self._lock:
            row = self._db.execute("SELECT * FROM webhooks WHERE id = ?",
                                   (webhook_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no webhook {webhook_id!r}")
        return row

    def delete(self, webhook_id: str) -> None:
        self.get(webhook_id)
        with self._tx() as db:
            db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
            db.execute("DELETE FROM outbox WHERE webhook_id = ? AND status = 'pending'",
                       (webhook_id,))

    def sync_config(self, settings: Config) -> None:
        """config.yaml's `webhooks:` as subscriptions with stable ids."""
        with self._tx() as db:
            db.execute("DELETE FROM webhooks WHERE source = 'config'")
        for hook in settings.webhooks:
            stable = hashlib.sha256(hook.url.encode()).hexdigest()[:32]
            self.add(url=hook.url, events=hook.events, source="config", webhook_id=stable,
                     headers={k: v.get_secret_value() for k, v in hook.headers.items()},
                     secret=hook.secret.get_secret_value() if hook.secret else None)

    # -- outbox
    def enqueue(self, event: JobEvent, *, webhook_id: str | None = None) -> int:
        """One row per webhook that wants this event (or for `webhook_id` only, whatever
        it subscribed to); returns how many were queued."""
        queued = 0
        body_fields = {k: v for k, v in event.items() if not k.startswith("_")}
        now = time.time()
        with self._tx() as db:
            for row in db.execute("SELECT id, events FROM webhooks").fetchall():
                wanted = json.loads(row["events"])
                if webhook_id is not None:
                    if row["id"] != webhook_id:
                        continue
                elif "*" not in wanted and event["event"] not in wanted:
                    continue
                delivery = uuid.uuid4().hex
                body = json.dumps({**body_fields, "delivery_id": delivery}, default=str)
                cursor = db.execute(
                    "INSERT OR IGNORE INTO outbox (delivery_id, webhook_id, event, event_id, "
                    "body, status, next_attempt, created_at) VALUES (?, ?, ?, ?, ?, "
                    "'pending', ?, ?)",
                    (delivery, row["id"], event["event"], event["event_id"], body, now, now))
                queued += cursor.rowcount
        return queued

    def due(self, limit: int = 50) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(
                "SELECT o.*, w.url, w.headers, w.secret FROM outbox o JOIN webhooks w "
                "ON w.id = o.webhook_id WHERE o.status = 'pending' AND o.next_attempt <= ? "
                "ORDER BY o.next_attempt LIMIT ?", (time.time(), limit)))

    def backlog(self) -> int:
        """Deliveries waiting for their first or next attempt."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'"
                                   ).fetchone()
        return int(row[0])

    def record(self, delivery_id: str, *, delivered: bool, status: int | None,
               error: str | None, next_attempt: float | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, response_status = ?, "
                "last_error = ?, status = ?, next_attempt = COALESCE(?, next_attempt), "
                "delivered_at = ? WHERE delivery_id = ?",
                (status, error, "delivered" if delivered else
                 ("pending" if next_attempt is not None else "failed"),
                 next_attempt, time.time() if delivered else None, delivery_id))

    def deliveries(self, webhook_id: str | None, limit: int) -> list[dict[str, Any]]:
        query = ("SELECT delivery_id, webhook_id, event, event_id, status, attempts, "
                 "response_status, last_error, created_at, delivered_at, next_attempt "
                 "FROM outbox")
        args: tuple[Any, ...] = ()
        if webhook_id:
            query += " WHERE webhook_id = ?"
            args = (webhook_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        return [dict(r) for r in rows]

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_state(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))


class Dispatcher:
    """Delivers due outbox rows; woken by new events, else it looks every second."""

    def __init__(self, store: WebhookStore, settings: Config, *,
                 attempted: Callable[..., None] | None = None) -> None:
        self.store = store
        self.attempted = attempted  # told each attempt's outcome (metrics)
        self.allowed = settings.daemon.webhook_allowed_networks
        self.base = settings.daemon.webhook_retry_base
        self.ceiling = settings.daemon.webhook_retry_max
        self.max_attempts = settings.daemon.webhook_max_attempts
        self.wake = asyncio.Event()

    async def on_event(self, event: JobEvent) -> None:
        if await asyncio.to_thread(self.store.enqueue, event):
            self.wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            while True:
                for row in await asyncio.to_thread(self.store.due):
                    await self.deliver(client, row)
                self.wake.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)

    async def deliver(self, client: httpx.AsyncClient, row: sqlite3.Row) -> None:
        body = row["body"].encode()
        headers = {**json.loads(row["headers"]), "Content-Type": "application/json",
                   "User-Agent": "hypervisord-webhooks", "X-Hypersdk-Event": row["event"],
                   "X-Hypersdk-Delivery": row["delivery_id"],
                   SIGNATURE_HEADER: sign(row["secret"], body)}
        status: int | None = None
        try:
            await asyncio.to_thread(check_url, row["url"], self.allowed)
            response = await client.post(row["url"], content=body, headers=headers)
            status = response.status_code
            error = None if response.is_success else f"HTTP {status}"
        except InvalidRequest as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempts = row["attempts"] + 1
        retry = None
        if error and attempts < self.max_attempts:
            retry = time.time() + min(self.base * 2 ** (attempts - 1), self.ceiling)
        if error:
            log.info("webhook delivery %s to %s failed (%s); %s", row["delivery_id"],
                     urlsplit(row["url"]).hostname, error,
                     f"retry in {retry - time.time():.0f} s" if retry else "giving up")
        await asyncio.to_thread(self.store.record, row["delivery_id"], delivered=error is None,
                                status=status, error=error, next_attempt=retry)
        if self.attempted is not None:
            self.attempted(delivered=error is None, retrying=retry is not None)
