"""The embedded Prefect server hypervisord starts when no PREFECT_API_URL is given:
`prefect server start` on SQLite, its database beside hypervisord's, UI included."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from core.errors import ConfigError


class EmbeddedPrefect:
    def __init__(self, *, data_dir: Path, port: int, log_file: Path) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 90.0) -> None:
        if self._answers():
            raise ConfigError(f"port {self.port} is taken by another server; set "
                              "daemon.prefect_ui_port to a free port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.update({
            "PREFECT_API_DATABASE_CONNECTION_URL":
                f"sqlite+aiosqlite:///{self.data_dir / 'prefect.db'}",
            "PREFECT_UI_API_URL": self.api_url,
        })
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
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
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
