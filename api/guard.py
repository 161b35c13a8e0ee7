"""What every HTTP request meets first, before a byte of its body is read: the API key,
then the body's size. A client without the key learns nothing (401, whatever it sent);
a body over `daemon.max_body_bytes` is refused with 413 without being buffered."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

from api.deps import key_matches

Message = dict[str, Any]
# what anyone may read: liveness, and the API's own description
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/openapi.json"})


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key sent as `X-API-Key: KEY` or `Authorization: Bearer KEY`."""
    by_name = {name.lower(): value.decode("latin-1") for name, value in headers}
    if by_name.get(b"x-api-key"):
        return by_name[b"x-api-key"]
    scheme, _, credentials = by_name.get(b"authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials else None


class RequestGuard:
    """ASGI middleware: the key check and the body limit, ahead of routing and parsing."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int,
                 public: tuple[str, ...] = ()) -> None:
        self.app = app
        self.api_key = api_key
        self.public = PUBLIC_PATHS | frozenset(public)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # the websocket checks its own key (?token= too)
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if self.api_key and scope["path"] not in self.public:
            given = presented_key(headers)
            if not given:
                await _answer(send, 401, "Unauthorized", "missing API key: send "
                              "'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
                return
            if not key_matches(given, self.api_key):
                await _answer(send, 401, "Unauthorized", "invalid API key")
                return
        declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if declared is not None and (not declared.isdigit()
                                     or int(declared) > self.max_body_bytes):
            await _answer(send, 413, "PayloadTooLarge", self._too_large())
            return
        await self.app(scope, self._limited(receive), send)

    def _too_large(self) -> str:
        return f"request body over the limit of {self.max_body_bytes} bytes"

    def _limited(self, receive: Any) -> Any:
        """`receive` that stops a body (sent without a length) once it passes the limit;
        FastAPI hands the 413 on as the answer."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        return limited


async def _answer(send: Any, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": kind, "message": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
