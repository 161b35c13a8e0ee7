"""Dependencies the routers declare: settings, the jobs store, the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.jobs import Jobs
from core.config import Config


def get_settings(request: Request) -> Config:
    settings: Config = request.app.state.settings
    return settings


def get_jobs(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


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
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[Config, Depends(get_settings)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
ApiKeyDep = Depends(require_api_key)
