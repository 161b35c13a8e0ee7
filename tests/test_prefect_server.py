"""The embedded default: hypervisord with no PREFECT_API_URL starts Prefect itself; and the
middleware that spares clients Prefect's 2 s back-off when SQLite is busy."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from api.prefect_server import RetryWhileLocked
from tests.peers import BIN, free_port, unique, wait_for_job, wait_until, write_config


async def _request(app: RetryWhileLocked, method: str, body: bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        return await client.request(method, "/api/thing", content=body)


def test_a_503_is_replayed_with_its_body_until_the_app_answers() -> None:
    calls: list[bytes] = []

    async def flaky(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        message = await receive()
        calls.append(message["body"])
        status = 503 if len(calls) < 3 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"locked" if status == 503 else b"ok"})
        if status == 503:
            raise RuntimeError("database is locked")  # Starlette re-raises after its 503

    response = asyncio.run(_request(RetryWhileLocked(flaky, delay=0.001), "POST", b"payload"))
    assert response.status_code == 200 and response.text == "ok"
    assert calls == [b"payload"] * 3


def test_a_lasting_503_is_handed_on() -> None:
    async def locked(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await receive()
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"locked"})

    app = RetryWhileLocked(locked, attempts=3, delay=0.001)
    assert asyncio.run(_request(app, "GET", b"")).status_code == 503


def test_embedded_prefect_server_migrates_and_stops_with_the_daemon(
    libvirt_uri: str, tmp_path: Path
) -> None:
    from hyper2kvm.sample import make_sample_ova
    from tests.helpers import domain_defined

    port, ui_port = free_port(), free_port()
    config = write_config(tmp_path, port=port, api_key="embedded-key")
    config.write_text(config.read_text().replace(
        "  workers: 4\n", f"  workers: 2\n  prefect_ui_port: {ui_port}\n"))
    name = unique()
    make_sample_ova(tmp_path / "inbox", name, size_mib=16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["DO_NOT_TRACK"] = "1"
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen([str(BIN / "hypervisord"), "--config", str(config)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).json()["status"] == "healthy"
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        wait_until(healthy, timeout=120, what="hypervisord with its own Prefect")
        assert (tmp_path / "db" / "prefect" / "prefect.db").exists()  # beside database.path
        ui = httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=10)
        assert ui.status_code == 200 and "<html" in ui.text.lower()
        with httpx.Client(base_url=url, headers={"X-API-Key": "embedded-key"}, timeout=30) as c:
            job = c.post("/jobs/submit", json={"vm_identifier": name}).json()
            info = wait_for_job(c, job["job_id"])
        assert info["status"] == "completed", info["error"]
        assert domain_defined(name)
        # that Prefect asks every client for the credential it generated (root-only)
        prefect_dir = tmp_path / "db" / "prefect"
        assert stat.S_IMODE(prefect_dir.stat().st_mode) == 0o700
        stored = prefect_dir / "auth_string"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert stat.S_IMODE((prefect_dir / "prefect.db").stat().st_mode) == 0o600
        user, _, password = stored.read_text().strip().partition(":")
        run_url = f"http://127.0.0.1:{ui_port}/api/flow_runs/{job['job_id']}"
        assert httpx.get(run_url).status_code == 401
        assert httpx.get(run_url, auth=(user, "guess")).status_code == 401
        flow_run = httpx.get(run_url, auth=(user, password)).json()
        assert flow_run["state"]["type"] == "COMPLETED"  # the job is that Prefect's flow run
    finally:
        daemon.terminate()
        code = daemon.wait(timeout=60)
    assert code == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{ui_port}/api/health", timeout=2)
