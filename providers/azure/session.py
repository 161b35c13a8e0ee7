"""Credentials and clients for one Azure subscription: a service principal or
azure-identity's default chain, ARM and login endpoints as configured (sovereign clouds,
a CA file), and azure-core's errors mapped onto `core.errors`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.identity import (
    ClientSecretCredential,
    CredentialUnavailableError,
    DefaultAzureCredential,
)
from azure.mgmt.authorization import AuthorizationManagementClient
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

from core.config import AzureProviderConfig
from core.errors import (
    AuthFailed,
    HypersdkError,
    NotFound,
    ProviderError,
    Transient,
    retry_after,
)
from providers.clients import ClientCache


def map_error(exc: BaseException, what: str) -> HypersdkError:
    """An azure-core or azure-identity error as a hypersdk error saying where and what."""
    if isinstance(exc, HypersdkError):
        return exc
    if isinstance(exc, CredentialUnavailableError | ClientAuthenticationError):
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return AuthFailed(f"{what}: Azure refused the credentials ({message})")
    if isinstance(exc, ResourceNotFoundError):
        return NotFound(f"{what}: {_message(exc)}")
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        if status in (401, 403):
            return AuthFailed(f"{what}: Azure refused the request ({_message(exc)})")
        if status == 404:
            return NotFound(f"{what}: {_message(exc)}")
        if status == 429 or status >= 500:
            headers = getattr(exc.response, "headers", None)
            return Transient(f"{what}: HTTP {status}: {_message(exc)}",
                             retry_after=retry_after(headers))
        return ProviderError(f"{what}: {_message(exc)}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError | ConnectionError
                  | TimeoutError):
        return Transient(f"{what}: cannot reach Azure: {exc}")
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}")


def _message(exc: HttpResponseError) -> str:
    error = getattr(exc, "error", None)
    if error is not None and getattr(error, "code", None):
        return f"{error.code}: {error.message}"
    return str(exc.message or exc).splitlines()[0]


def call(fn: Any, what: str, /, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - mapped
        raise map_error(exc, what) from None


@dataclass(frozen=True)
class Clients:
    compute: ComputeManagementClient
    network: NetworkManagementClient
    authorization: AuthorizationManagementClient
    config: AzureProviderConfig

    def blob_options(self) -> dict[str, Any]:
        """Options for azure-storage-blob clients: the configured CA trusted as ARM's is,
        on the storage SDK's own transport (its 4 MiB socket reads; a plain
        RequestsTransport reads 4 KiB at a time, measured 2x slower)."""
        return {"connection_verify": str(self.config.ca_file) if self.config.ca_file
                else True}


def _transport(config: AzureProviderConfig) -> RequestsTransport:
    return RequestsTransport(connection_verify=str(config.ca_file) if config.ca_file else True)


def _credential(config: AzureProviderConfig) -> Any:
    authority = config.authority.removeprefix("https://").rstrip("/")
    custom = config.authority != "https://login.microsoftonline.com"
    if config.tenant_id and config.client_id and config.client_secret:
        return ClientSecretCredential(
            config.tenant_id, config.client_id, config.client_secret.get_secret_value(),
            authority=authority, disable_instance_discovery=custom,
            transport=_transport(config))
    return DefaultAzureCredential(authority=authority, transport=_transport(config))


def make_clients(config: AzureProviderConfig) -> Clients:
    credential = _credential(config)
    options: dict[str, Any] = {
        "base_url": config.arm_endpoint.rstrip("/"),
        "credential_scopes": [f"{config.arm_endpoint.rstrip('/')}/.default"],
        "transport": _transport(config),
        "polling_interval": 5,  # when ARM sends no Retry-After (azure-core's default: 30 s)
    }
    return Clients(
        compute=ComputeManagementClient(credential, config.subscription_id, **options),
        network=NetworkManagementClient(credential, config.subscription_id, **options),
        authorization=AuthorizationManagementClient(credential, config.subscription_id,
                                                    **options),
        config=config)


_CLIENTS: ClientCache[AzureProviderConfig, Clients] = ClientCache(make_clients)


def clients_for(config: AzureProviderConfig) -> Clients:
    """The process's clients for this section (the credential caches its token and
    renews it)."""
    return _CLIENTS.get(config)
