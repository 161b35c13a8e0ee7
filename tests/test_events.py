"""The websocket and webhooks, fed by Prefect's event stream: real websocket clients and a
real HTTP receiver on loopback, following real jobs."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from hyper2kvm.sample import make_sample_ova
from tests.peers import (
    SESSION_DIR,
    Daemon,
    free_port,
    start_daemon,
    stop_daemon,
    unique,
    wait_for_job,
    wait_until,
)
from tests.test_jobs import submit


class Receiver:
    """An HTTP endpoint on loopback that records what it is sent; can be down."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[dict[str, Any]] = []
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"headers": dict(self.headers), "body": body,
                                 "json": json.loads(body)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def events(self, job_id: str) -> list[str]:
        return [r["json"]["event"] for r in self.received if r["json"].get("job_id") == job_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    down = Receiver()
    yield down
    down.stop()


def ws_url(daemon: Daemon) -> str:
    return daemon.url.replace("http://", "ws://") + "/websocket"


def collect(client: ClientConnection, until: Any, timeout: float = 120) -> list[dict]:
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = json.loads(client.recv(timeout=max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            break
        messages.append(message)
        if until(message):
            return messages
    raise AssertionError(f"timed out; got {[m.get('event', m['type']) for m in messages]}")


# ---- websocket ----------------------------------------------------------------------------


def test_websocket_needs_the_key(daemon: Daemon) -> None:
    with pytest.raises(InvalidStatus), connect(ws_url(daemon)) as client:
        client.recv(timeout=5)
    with pytest.raises(InvalidStatus), connect(ws_url(daemon) + "?token=wrong") as client:
        client.recv(timeout=5)


def test_several_websocket_clients_follow_a_job_to_completion(
        api: httpx.Client, daemon: Daemon) -> None:
    # a VM whose conversion lasts seconds: progress events come at most twice a second,
    # and a job over in a blink may send only its first (0 %)
    sample_vm = unique("ws")
    make_sample_ova(daemon.inbox, sample_vm, size_mib=256, random_mib=192)
    key = daemon.api_key
    clients = [connect(ws_url(daemon), additional_headers={"Authorization": f"Bearer {key}"})
               for _ in range(3)]
    clients.append(connect(ws_url(daemon) + f"?token={key}"))
    with_results = connect(ws_url(daemon) + f"?token={key}&results=true")
    clients.append(with_results)
    other = connect(ws_url(daemon) + f"?token={key}&job_id=00000000-0000-0000-0000-000000000000")
    try:
        for client in (*clients, other):
            snapshot = json.loads(client.recv(timeout=30))
            assert snapshot["type"] == "snapshot" and isinstance(snapshot["jobs"], list)
        job_id = submit(api, vm_identifier=sample_vm, export_method="ova",
                        hyper2kvm_integration={"replace_existing": True})
        follower = clients[0]
        follower.send(json.dumps({"subscribe": job_id}))
        for client in clients:
            seen = collect(client, lambda m: m.get("job_id") == job_id
                           and m.get("event") in ("job.completed", "job.failed"))
            mine = [m for m in seen if m.get("job_id") == job_id]
            names = [m["event"] for m in mine]
            assert names[-1] == "job.completed", names
            assert "job.started" in names and "job.progress" in names
            progress = [m["progress"] for m in mine if m["event"] == "job.progress"]
            assert progress == sorted(progress) and 0 < progress[-1] <= 100
            done = mine[-1]
            assert done["status"] == "completed" and done["vm"] == sample_vm
            assert done["provider"] == "local"
            if client is with_results:  # the result, as /jobs/query has it
                result = api.get("/jobs/query", params={"job_id": job_id}).json()["result"]
                assert result["domain_name"] == sample_vm and done["result"] == result
            else:
                assert done["result"] is None
        # a client following another job heard nothing of this one
        with pytest.raises(TimeoutError):
            while True:
                message = json.loads(other.recv(timeout=1))
                assert message.get("job_id") != job_id
    finally:
        for client in (*clients, other):
            client.close()


def test_a_client_that_does_not_read_is_dropped_without_slowing_others(
        daemon: Daemon) -> None:
    key = daemon.api_key
    url = ws_url(daemon) + f"?token={key}"
    before = httpx.get(f"{daemon.url}/health").json()["websocket_clients"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # tiny window: backpressure
    sock.connect((daemon.url.split("//")[1].split(":")[0], int(daemon.url.rsplit(":", 1)[1])))
    slow = connect(url, sock=sock, max_queue=1)  # reads nothing once one message waits
    steady = connect(url)
    assert json.loads(steady.recv(timeout=30))["type"] == "snapshot"

    def flood() -> None:  # asks for answers it never reads
        with contextlib.suppress(Exception):
            for _ in range(50000):
                slow.send('{"type": "ping"}')

    threading.Thread(target=flood, daemon=True).start()
    wait_until(lambda: httpx.get(f"{daemon.url}/health").json()["websocket_clients"]
               == before + 1, timeout=60, what="the slow client to be dropped")
    # the other client was answered throughout, and still is
    started = time.monotonic()
    steady.send('{"type": "ping"}')
    assert json.loads(steady.recv(timeout=5)) == {"type": "pong"}
    assert time.monotonic() - started < 5
    steady.close()
    slow.close()


# ---- webhooks -----------------------------------------------------------------------------


def test_webhook_urls_and_events_are_checked(api: httpx.Client) -> None:
    for url, reason in (("http://169.254.169.254/latest/meta-data", "link-local"),
                        ("http://metadata.google.internal/x", "metadata"),
                        ("ftp://example.com/x", "http:// or https://"),
                        ("http://[::1]:9/x", "loopback")):
        response = api.post("/webhooks/configure", json={"url": url})
        assert response.status_code == 422, url
        assert reason in response.json()["message"], response.json()
    response = api.post("/webhooks/configure", json={"url": "http://127.0.0.1:9/x",
                                                     "events": ["job.exploded"]})
    assert response.status_code == 422 and "job.exploded" in response.json()["message"]


def _verify(record: dict, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), record["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(record["headers"]["X-Hypersdk-Signature-256"], expected)


def test_webhook_delivered_once_the_receiver_is_back(
        api: httpx.Client, daemon: Daemon, sample_vm: str, receiver: Receiver) -> None:
    created = api.post("/webhooks/configure", json={
        "url": receiver.url, "events": ["job.started", "job.completed", "job.failed"],
        "headers": {"Authorization": "Bearer token123"}})
    assert created.status_code == 200, created.text
    hook = created.json()
    secret = hook["secret"]
    listed = api.get("/webhooks").json()["webhooks"]
    mine = next(w for w in listed if w["id"] == hook["id"])
    assert mine["headers"] == {"Authorization": "***"} and "secret" not in mine
    assert "token123" not in json.dumps(listed)
    try:
        job_id = submit(api, vm_identifier=sample_vm, export_method="ova",
                        hyper2kvm_integration={"enabled": False})  # receiver is down
        assert wait_for_job(api, job_id)["status"] == "completed"

        def failed_attempts() -> list[dict]:
            rows = api.get("/webhooks/deliveries", params={"webhook_id": hook["id"]}).json()
            return [r for r in rows["deliveries"] if r["attempts"] >= 1 and r["last_error"]]

        pending = wait_until(failed_attempts, timeout=60, what="failed delivery attempts")
        assert all(r["status"] == "pending" for r in pending)
        receiver.start()
        wait_until(lambda: {"job.started", "job.completed"} <= set(receiver.events(job_id)),
                   timeout=60, what="the deliveries after the receiver came back")
        records = [r for r in receiver.received if r["json"].get("job_id") == job_id]
        for record in records:
            assert _verify(record, secret), "bad signature"
            assert record["headers"]["Authorization"] == "Bearer token123"
            assert record["headers"]["X-Hypersdk-Delivery"] == record["json"]["delivery_id"]
            assert record["json"]["vm"] == sample_vm and record["json"]["provider"] == "local"
        completed = next(r["json"] for r in records if r["json"]["event"] == "job.completed")
        assert completed["status"] == "completed" and completed["result"]["export"]
        rows = api.get("/webhooks/deliveries", params={"webhook_id": hook["id"]}).json()
        assert {r["status"] for r in rows["deliveries"]
                if r["event"] in ("job.started", "job.completed")} == {"delivered"}
        # the test delivery
        tested = api.post(f"/webhooks/{hook['id']}/test").json()
        assert tested["status"] == "delivered", tested
        assert any(r["json"]["event"] == "webhook.test" for r in receiver.received)
    finally:
        assert api.delete(f"/webhooks/{hook['id']}").status_code == 200
    assert hook["id"] not in {w["id"] for w in api.get("/webhooks").json()["webhooks"]}


def test_pending_deliveries_and_missed_events_survive_a_daemon_restart(
        api: httpx.Client, daemon: Daemon, sample_vm: str, receiver: Receiver) -> None:
    """A second daemon (not running flows; the session daemon runs them) holds a webhook:
    a delivery pending when it stops, and a job finished while it is down, both reach the
    receiver after it starts again."""
    root = SESSION_DIR / unique("restart")
    notifier = start_daemon(root, api_key="k", args=("--no-serve",))
    try:
        with notifier.client() as client:
            hook = client.post("/webhooks/configure", json={
                "url": receiver.url, "events": ["job.completed"]}).json()
        first = submit(api, vm_identifier=sample_vm, export_method="ova",
                       hyper2kvm_integration={"enabled": False})
        assert wait_for_job(api, first)["status"] == "completed"

        def queued() -> bool:
            with notifier.client() as client:
                rows = client.get("/webhooks/deliveries").json()["deliveries"]
            return any(r["event"] == "job.completed" and r["attempts"] >= 1 for r in rows)

        wait_until(queued, timeout=60, what="a pending delivery")
    finally:
        assert stop_daemon(notifier) == 0
    second = submit(api, vm_identifier=sample_vm, export_method="ova",
                    hyper2kvm_integration={"enabled": False})
    assert wait_for_job(api, second)["status"] == "completed"  # while the notifier is down
    receiver.start()
    notifier = start_daemon(root, api_key="k", args=("--no-serve",))
    try:
        def both() -> bool:
            return bool(receiver.events(first) and receiver.events(second))

        try:
            wait_until(both, timeout=60, what="deliveries after the restart")
        except AssertionError:
            with notifier.client() as client:
                rows = client.get("/webhooks/deliveries").json()["deliveries"]
            raise AssertionError(f"first {receiver.events(first)}, second "
                                 f"{receiver.events(second)}; outbox {rows}; log "
                                 f"{notifier.log.read_text()[-3000:]}") from None
        assert receiver.events(first) == ["job.completed"]
        assert receiver.events(second) == ["job.completed"]
        for record in receiver.received:
            assert _verify(record, hook["secret"])
    finally:
        assert stop_daemon(notifier) == 0
