"""Credentials and clients for one GCP project: a service account's key file or
Application Default Credentials, the Compute, Cloud Build, Storage, Resource Manager and
Artifact Registry endpoints as configured, long-running operations waited on through the
same endpoint, and google-api-core's errors mapped onto `core.errors`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import google.auth
import google.cloud.storage as storage
import requests
from google.api_core import exceptions as api
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth
from google.cloud import artifactregistry_v1, compute_v1, resourcemanager_v3
from google.cloud.devtools import cloudbuild_v1
from google.oauth2 import service_account

from core.config import GCPProviderConfig
from core.errors import AuthFailed, HypersdkError, NotFound, ProviderError, Transient
from providers.clients import ClientCache

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
T = TypeVar("T")


def map_error(exc: BaseException, what: str) -> HypersdkError:
    """A google-api-core or google-auth error as a hypersdk error saying where and what."""
    if isinstance(exc, HypersdkError):
        return exc
    if isinstance(exc, auth.RefreshError | auth.DefaultCredentialsError):
        reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else exc
        return AuthFailed(f"{what}: GCP refused the credentials ({_first_line(reason)})")
    if isinstance(exc, api.Unauthorized | api.Unauthenticated | api.PermissionDenied
                  | api.Forbidden):
        return AuthFailed(f"{what}: GCP refused the request ({_api_message(exc)})")
    if isinstance(exc, api.NotFound):
        return NotFound(f"{what}: {_api_message(exc)}")
    if isinstance(exc, api.TooManyRequests | api.ServerError | api.ServiceUnavailable):
        return Transient(f"{what}: {_api_message(exc)}")
    if isinstance(exc, api.GoogleAPICallError):
        return ProviderError(f"{what}: {_api_message(exc)}")
    if isinstance(exc, auth.TransportError | requests.ConnectionError | requests.Timeout
                  | ConnectionError | TimeoutError):
        return Transient(f"{what}: cannot reach GCP: {_first_line(exc)}")
    return ProviderError(f"{what}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException | str) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def _api_message(exc: api.GoogleAPICallError) -> str:
    return f"HTTP {exc.code}: {exc.message}" if exc.code else _first_line(exc)


def call(fn: Callable[[], T], what: str) -> T:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - mapped
        raise map_error(exc, what) from None


@dataclass(frozen=True)
class Clients:
    config: GCPProviderConfig
    instances: compute_v1.InstancesClient
    machine_types: compute_v1.MachineTypesClient
    disks: compute_v1.DisksClient
    images: compute_v1.ImagesClient
    networks: compute_v1.NetworksClient
    zone_operations: compute_v1.ZoneOperationsClient
    global_operations: compute_v1.GlobalOperationsClient
    builds: cloudbuild_v1.CloudBuildClient
    storage: storage.Client
    projects: resourcemanager_v3.ProjectsClient
    artifacts: artifactregistry_v1.ArtifactRegistryClient

    @property
    def project(self) -> str:
        return self.config.project

    def wait(self, operation: Any, what: str, *, timeout: float = 3600.0,
             on_poll: Callable[[], None] | None = None) -> None:
        """Wait for a Compute operation (zonal or global) through this endpoint's
        operations clients: `ExtendedOperation.result()` would poll Google's."""
        zone = str(getattr(operation, "zone", "") or "").rsplit("/", 1)[-1]
        name = operation.name
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            current = call(lambda: (
                self.zone_operations.get(project=self.project, zone=zone, operation=name)
                if zone else self.global_operations.get(project=self.project,
                                                        operation=name)), what)
            if current.status == compute_v1.Operation.Status.DONE:
                errors = list(current.error.errors) if current.error else []
                if errors:
                    raise ProviderError(f"{what}: " + "; ".join(
                        f"{e.code}: {e.message}" for e in errors))
                return
            if time.monotonic() > deadline:
                raise Transient(f"{what}: not done after {timeout:.0f} s")
            if on_poll:
                on_poll()
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)


def _credentials(config: GCPProviderConfig) -> Any:
    if config.credentials_file:
        try:
            return service_account.Credentials.from_service_account_file(
                str(config.credentials_file), scopes=SCOPES)
        except (OSError, ValueError) as exc:
            raise AuthFailed(f"GCP credentials_file {config.credentials_file}: "
                             f"{_first_line(exc)}") from None
    credentials, _ = call(lambda: google.auth.default(scopes=SCOPES), "GCP credentials")
    return credentials


def _options(endpoint: str | None) -> ClientOptions | None:
    return ClientOptions(api_endpoint=endpoint) if endpoint else None


def make_clients(config: GCPProviderConfig) -> Clients:
    credentials = _credentials(config)
    compute: dict[str, Any] = {"credentials": credentials, "transport": "rest",
                               "client_options": _options(config.compute_endpoint)}
    return Clients(
        config=config,
        instances=compute_v1.InstancesClient(**compute),
        machine_types=compute_v1.MachineTypesClient(**compute),
        disks=compute_v1.DisksClient(**compute),
        images=compute_v1.ImagesClient(**compute),
        networks=compute_v1.NetworksClient(**compute),
        zone_operations=compute_v1.ZoneOperationsClient(**compute),
        global_operations=compute_v1.GlobalOperationsClient(**compute),
        builds=cloudbuild_v1.CloudBuildClient(
            credentials=credentials, transport="rest",
            client_options=_options(config.cloudbuild_endpoint)),
        storage=storage.Client(project=config.project, credentials=credentials,
                               client_options=_options(config.storage_endpoint)),
        projects=resourcemanager_v3.ProjectsClient(
            credentials=credentials, transport="rest",
            client_options=_options(config.resourcemanager_endpoint)),
        artifacts=artifactregistry_v1.ArtifactRegistryClient(
            credentials=credentials, transport="rest",
            client_options=_options(config.artifactregistry_endpoint)))


_CLIENTS: ClientCache[GCPProviderConfig, Clients] = ClientCache(make_clients)


def clients_for(config: GCPProviderConfig) -> Clients:
    """The process's clients for this section (the credentials cache their token and
    renew it)."""
    return _CLIENTS.get(config)
