"""One place that turns errors into HTTP answers: JSON with a message, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from core.errors import (
    AuthFailed,
    Conflict,
    DomainExists,
    HypersdkError,
    InvalidRequest,
    JobNotFound,
    NotFound,
    RegistrationError,
    Transient,
    Unsupported,
)

logger = logging.getLogger("hypervisord.api")

_STATUS: list[tuple[type[HypersdkError], int]] = [
    (Conflict, 409),
    (DomainExists, 409),
    (RegistrationError, 502),
    (JobNotFound, 404),
    (NotFound, 404),
    (InvalidRequest, 422),
    (Unsupported, 501),
    (AuthFailed, 502),
    (Transient, 503),
]


def _error(status: int, kind: str, message: str, detail: list | None = None) -> JSONResponse:
    body: dict = {"error": kind, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


async def _hypersdk_error(_request: Request, exc: Exception) -> JSONResponse:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    if status == 500:
        logger.error("request failed: %s: %s", type(exc).__name__, exc)
    return _error(status, type(exc).__name__, str(exc))


def _location(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = []
    messages = []
    for item in exc.errors():
        where = _location(item.get("loc", ()))
        if item.get("type") == "json_invalid":
            message = f"malformed JSON: {item.get('ctx', {}).get('error', item.get('msg'))}"
        elif item.get("type") == "extra_forbidden":
            message = f"{where}: unknown field"
        elif item.get("type") == "missing":
            message = f"{where}: field required"
        else:
            message = f"{where}: {item.get('msg')}"
        messages.append(message)
        detail.append({"field": where, "message": message})
    return _error(422, "InvalidRequest", "; ".join(messages), detail)


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path answers (Starlette names only the first
    route's, and each of our routes has one method)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
            413: "PayloadTooLarge"}.get(
        exc.status_code, "HTTPError")
    response = _error(exc.status_code, kind, str(exc.detail))
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    if exc.status_code == 405:
        response.headers["Allow"] = _allowed_methods(request)
    return response


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    return _error(500, "InternalError", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HypersdkError, _hypersdk_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
