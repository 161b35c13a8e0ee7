"""The Prefect server hypervisord starts when no PREFECT_API_URL is given: Prefect's own
server app (API, UI, services) on SQLite, its database beside hypervisord's.

It is served behind one small ASGI middleware, `RetryWhileLocked`. SQLite allows one
writer; when two requests race, Prefect answers 503 ("database is locked") and its
client waits 2 s, then 4 s, before trying again, which a single migration can hit
several times. The middleware replays such a request in the server after a few
milliseconds instead (the failed transaction was rolled back), and hands the 503 on only
if the database stays locked. Run as `python -m api.prefect_server --port N`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from core.errors import ConfigError
from core.files import private_file, private_folder, write_private
from core.process import alive, command_line, die_with_parent

logger = logging.getLogger("hypervisord")

Message = dict[str, Any]


_READS = ("/filter", "/count", "/paginate", "/history", "/health")


def _writes(scope: Message) -> bool:
    """Whether an API request writes (Prefect reads with POST .../filter too)."""
    return scope["method"] in ("POST", "PUT", "PATCH", "DELETE") and not str(
        scope["path"]).rstrip("/").endswith(_READS)


class RetryWhileLocked:
    """Lets one API write at a time into SQLite, and replays a request whose answer is
    503 (the server's own services also write), up to `attempts` times.

    Taking turns beats racing: 50 flow runs created at once took 5.9 s when every writer
    raced for SQLite's lock and backed off, ~25 ms each when they queue here."""

    def __init__(self, app: Any, *, attempts: int = 40, delay: float = 0.02,
                 max_delay: float = 0.25) -> None:
        self.app = app
        self.attempts = attempts
        self.delay = delay
        self.max_delay = max_delay
        self._one_writer = asyncio.Lock()

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if _writes(scope):
            async with self._one_writer:
                await self._replayed(scope, body, receive, send)
        else:
            await self._replayed(scope, body, receive, send)

    async def _replayed(self, scope: Message, body: bytes, receive: Any, send: Any) -> None:
        delay = self.delay
        for attempt in range(self.attempts):
            if await self._attempt(scope, body, receive, send,
                                   last=attempt == self.attempts - 1):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self.max_delay)

    async def _attempt(self, scope: Message, body: bytes, receive: Any, send: Any, *,
                       last: bool) -> bool:
        """One run of the app; False when it answered 503 and should be replayed."""
        delivered = False
        state = {"replay": False, "passing": False}

        async def replayed_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the client to disconnect

        async def filtered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["replay"] = message["status"] == 503 and not last
                state["passing"] = not state["replay"]
            if state["passing"]:
                await send(message)

        try:
            # routing writes into the scope it is given: every attempt gets a fresh copy
            await self.app(dict(scope), replayed_receive, filtered_send)
        except Exception:
            # Starlette re-raises after its handler has sent the 503; a replay absorbs it
            if not state["replay"]:
                raise
        return not state["replay"]


def open_private_log(path: Path) -> Any:
    """The server's log, appended to, readable by root only (requests may quote secrets)."""
    return open(private_file(path), "ab")  # noqa: SIM115 - handed to the child process


def serve(host: str, port: int, log_level: str) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(final=True, webserver_only=False)
    uvicorn.run(RetryWhileLocked(app), host=host, port=port, log_level=log_level,
                timeout_keep_alive=5)


AUTH_USER = "hypersdk"


def server_credential(data_dir: Path, configured: str | None = None) -> str:
    """The "user:password" the embedded server requires of every API and UI request:
    `configured`, or the one generated at first start and kept in `data_dir/auth_string`
    (0600, in a 0700 folder)."""
    private_folder(data_dir)
    if configured:
        return configured
    stored = data_dir / "auth_string"
    if stored.is_file():
        private_file(stored)
        text = stored.read_text().strip()
        if ":" in text:
            return text
    credential = f"{AUTH_USER}:{secrets.token_urlsafe(32)}"
    write_private(stored, credential + "\n")
    return credential


def _server_child() -> None:
    """In the server's process before exec: it never outlives hypervisord (even a
    SIGKILLed one), and what it creates (its database, results) is its owner's alone."""
    die_with_parent()
    os.umask(0o077)


class EmbeddedPrefect:
    """The server as a child process of hypervisord."""

    def __init__(self, *, data_dir: Path, port: int, log_file: Path, auth_string: str,
                 host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.port = port
        self.host = host
        self.log_file = log_file
        self.auth_string = auth_string
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "server.pid"

    def _stop_orphan(self) -> bool:
        """Stop a server of ours a previous hypervisord left running (one that died with
        SIGKILL before its server learnt to die with it); False if the port's server is
        not ours."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        argv = command_line(pid)
        if "api.prefect_server" not in argv or str(self.port) not in argv:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        while self._answers() and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        return True

    def start(self, timeout: float = 90.0) -> None:
        if self._answers():
            if not self._stop_orphan():
                raise ConfigError(f"port {self.port} is taken by another server; set "
                                  "daemon.prefect_ui_port to a free port")
            logger.warning("replaced the Prefect server a previous hypervisord left on port "
                           "%d", self.port)
        private_folder(self.data_dir)
        for database in ("prefect.db", "prefect.db-wal", "prefect.db-shm"):
            if (self.data_dir / database).exists():
                private_file(self.data_dir / database)
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_API_KEY", None)  # it would win over the auth string
        env.update({
            "PREFECT_API_DATABASE_CONNECTION_URL":
                f"sqlite+aiosqlite:///{self.data_dir / 'prefect.db'}",
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_AUTH_STRING": self.auth_string,
            "PREFECT_API_AUTH_STRING": self.auth_string,  # the server's own services
        })
        log = open_private_log(self.log_file)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.prefect_server", "--host", self.host,
             "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C on the daemon's terminal is ours to handle
            preexec_fn=_server_child,
        )
        write_private(self.pid_file, f"{self.process.pid} {self.port}\n")
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise ConfigError(f"the embedded Prefect server exited ({self.process.returncode});"
                                  f" see {self.log_file}")
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the embedded Prefect server did not answer in {timeout:.0f}s;"
                                  f" see {self.log_file}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m api.prefect_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    serve(args.host, args.port, args.log_level)


if __name__ == "__main__":
    main()
