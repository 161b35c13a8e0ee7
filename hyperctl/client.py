"""The daemon as hyperctl reaches it: where (flags, environment, config file), with which
key, and what its answers mean for the exit code.

Exceptions, each with the exit code scripts can rely on::

    CtlError              (its .code)
    ├── UsageError        2  the request was wrong: bad arguments, or the API said 4xx
    └── Unreachable       4  no answer, or the daemon refused the key (401/403) or failed (5xx)

A job that ends failed exits 1 and a cancelled one 3 (hyperctl.main)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

DEFAULT_URL = "http://127.0.0.1:8080"
CONFIG_FILE = Path("~/.config/hypersdk/hyperctl.yaml")


class CtlError(Exception):
    code = 1


class UsageError(CtlError):
    code = 2


class Unreachable(CtlError):
    code = 4


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def resolve_target(*, url: str | None, api_key: str | None,
                   config: Path | None) -> Target:
    """Flags win over HYPERSDK_URL / HYPERSDK_API_KEY, which win over the config file
    (`url:` and `api_key:`; default ~/.config/hypersdk/hyperctl.yaml, or HYPERSDK_CTL_CONFIG)."""
    path = config or Path(os.environ.get("HYPERSDK_CTL_CONFIG") or CONFIG_FILE).expanduser()
    stored: dict[str, Any] = {}
    if config is not None or path.is_file():
        try:
            stored = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
        if not isinstance(stored, dict) or set(stored) - {"url", "api_key"}:
            raise UsageError(f"{path}: expected a mapping with url and api_key")
    chosen = url or os.environ.get("HYPERSDK_URL") or stored.get("url") or DEFAULT_URL
    key = api_key or os.environ.get("HYPERSDK_API_KEY") or stored.get("api_key")
    if not str(chosen).startswith(("http://", "https://")):
        raise UsageError(f"the daemon's URL must start with http:// or https://: {chosen!r}")
    return Target(url=str(chosen).rstrip("/"), api_key=str(key) if key else None)


def api_message(response: httpx.Response) -> str:
    """The API's own message (its errors are {"error", "message", "detail"}), on one line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(message, list):  # a validation error's items
            message = "; ".join(f"{'.'.join(map(str, m.get('loc', [])))}: {m.get('msg')}"
                                for m in message if isinstance(m, dict))
        if message:
            return " ".join(str(message).split())
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


class Daemon:
    """hypervisord's REST API: answers as JSON, failures as CtlError."""

    def __init__(self, target: Target, *, timeout: float = 30.0) -> None:
        self.target = target
        self.http = httpx.Client(base_url=target.url, headers=target.headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach hypervisord at {self.target.url}: "
                              f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        self.check(response)
        return response.json()

    def check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        message = api_message(response)
        if response.status_code in (401, 403):
            raise Unreachable(f"hypervisord refused the request: {message} (set "
                              "--api-key or HYPERSDK_API_KEY)")
        if response.status_code >= 500:
            raise Unreachable(f"hypervisord failed: {message}")
        raise UsageError(message)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def stream_lines(self, path: str, **params: Any) -> Any:
        """An NDJSON stream's lines, as they come."""
        try:
            with self.http.stream("GET", path, params=params, timeout=None) as response:
                if not response.is_success:
                    response.read()
                    self.check(response)
                yield from (line for line in response.iter_lines() if line.strip())
        except httpx.HTTPError as exc:
            raise Unreachable(f"lost hypervisord at {self.target.url}: {exc}") from None

    def websocket_url(self, **params: str) -> str:
        base = "ws" + self.target.url.removeprefix("http")
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"{base}/websocket?{query}"
