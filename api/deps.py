"""Dependencies the routers declare: settings, jobs, schedule books, the webhook store and
dispatcher, the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.jobs import Jobs
from api.metrics import Metrics
from api.schedules import ScheduleBook
from api.webhooks import Dispatcher, WebhookStore
from core.config import Config


def get_settings(request: Request) -> Config:
    settings: Config = request.app.state.settings
    return settings


def get_jobs(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


def get_schedules(request: Request) -> ScheduleBook:
    book: ScheduleBook = request.app.state.schedules
    return book


def get_policies(request: Request) -> ScheduleBook:
    book: ScheduleBook = request.app.state.policies
    return book


def get_webhooks(request: Request) -> WebhookStore:
    store: WebhookStore = request.app.state.webhooks
    return store


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def key_matches(given: str | None, expected: str) -> bool:
    """The one comparison of a presented API key (constant time)."""
    return bool(given) and secrets.compare_digest(str(given).encode(), expected.encode())


_bearer = HTTPBearer(auto_error=False)
_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> None:
    """Every endpoint but /health needs the key, as a Bearer token or X-API-Key."""
    expected: str | None = request.app.state.settings.api_key
    if not expected:
        return
    given = header or (bearer.credentials if bearer else None)
    if not given:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>' "
                                 "or 'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})
    if not key_matches(given, expected):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def require_api_key_for_metrics(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> None:
    """/metrics needs the key too, unless daemon.metrics_public."""
    if not request.app.state.settings.daemon.metrics_public:
        require_api_key(request, bearer, header)


SettingsDep = Annotated[Config, Depends(get_settings)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
SchedulesDep = Annotated[ScheduleBook, Depends(get_schedules)]
PoliciesDep = Annotated[ScheduleBook, Depends(get_policies)]
WebhooksDep = Annotated[WebhookStore, Depends(get_webhooks)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
ApiKeyDep = Depends(require_api_key)
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
MetricsKeyDep = Depends(require_api_key_for_metrics)
