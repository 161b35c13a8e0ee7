"""Signing and clients for one OCI tenancy: an API signing key given in the config or an
OCI config file's profile, every request signed by the SDK's own signer, the service
endpoints as configured, and the SDK's errors mapped onto `core.errors`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import oci
import requests

from core.config import OCIProviderConfig
from core.errors import AuthFailed, HypersdkError, NotFound, ProviderError, Transient
from providers.clients import ClientCache

T = TypeVar("T")


def map_error(exc: BaseException, what: str) -> HypersdkError:
    """An OCI SDK error as a hypersdk error saying where and what."""
    if isinstance(exc, HypersdkError):
        return exc
    if isinstance(exc, oci.exceptions.ServiceError):
        detail = f"{exc.code}: {exc.message}"
        if exc.status in (401, 403):
            return AuthFailed(f"{what}: OCI refused the request ({detail})")
        if exc.status == 404:
            return NotFound(f"{what}: {detail}")
        if exc.status == 429 or exc.status >= 500:
            return Transient(f"{what}: HTTP {exc.status}: {detail}")
        return ProviderError(f"{what}: {detail}")
    if isinstance(exc, oci.exceptions.MaximumWaitTimeExceeded):  # a ClientError too
        return Transient(f"{what}: not done within the wait: {_first_line(exc)}")
    if isinstance(exc, oci.exceptions.ClientError):  # config, key, passphrase
        return AuthFailed(f"{what}: OCI credentials: {_first_line(exc)}")
    if isinstance(exc, oci.exceptions.RequestException | requests.ConnectionError
                  | requests.Timeout | ConnectionError | TimeoutError):
        return Transient(f"{what}: cannot reach OCI: {_first_line(exc)}")
    return ProviderError(f"{what}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def call(fn: Callable[[], T], what: str) -> T:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - mapped
        raise map_error(exc, what) from None


def sdk_config(config: OCIProviderConfig) -> dict[str, Any]:
    """The SDK's config dict: the key given here, else the config file's profile."""
    if config.tenancy and config.user and config.fingerprint:
        settings: dict[str, Any] = {"tenancy": config.tenancy, "user": config.user,
                                    "fingerprint": config.fingerprint,
                                    "region": config.region or "us-ashburn-1"}
        if config.key_content:
            settings["key_content"] = config.key_content.get_secret_value()
        elif config.key_file:
            settings["key_file"] = str(config.key_file)
    else:
        settings = call(lambda: oci.config.from_file(
            str(config.config_file or oci.config.DEFAULT_LOCATION), config.profile),
            "OCI config file")
        if config.region:
            settings["region"] = config.region
    call(lambda: oci.config.validate_config(settings), "OCI config")
    return settings


@dataclass(frozen=True)
class Clients:
    config: OCIProviderConfig
    compute: oci.core.ComputeClient
    network: oci.core.VirtualNetworkClient
    blockstorage: oci.core.BlockstorageClient
    work_requests: oci.work_requests.WorkRequestClient
    objects: oci.object_storage.ObjectStorageClient
    tenancy: str

    @property
    def compartment(self) -> str:
        return self.config.compartment_id or self.tenancy

    def namespace(self) -> str:
        if self.config.namespace:
            return self.config.namespace
        return str(call(lambda: self.objects.get_namespace().data, "OCI namespace"))


def make_clients(config: OCIProviderConfig) -> Clients:
    settings = sdk_config(config)

    def endpoint(value: str | None) -> dict[str, Any]:
        return {"service_endpoint": value} if value else {}

    # throttling and 5xx retried a few times, briefly: the SDK's default strategy keeps an
    # unreachable endpoint busy for minutes (measured 94 s), behind an API call
    retries = oci.retry.RetryStrategyBuilder(
        max_attempts_check=True, max_attempts=3, total_elapsed_time_check=True,
        total_elapsed_time_seconds=30, retry_max_wait_between_calls_seconds=5,
        service_error_check=True).get_retry_strategy()
    iaas = {**endpoint(config.compute_endpoint), "retry_strategy": retries}
    return Clients(
        config=config,
        compute=oci.core.ComputeClient(settings, **iaas),
        network=oci.core.VirtualNetworkClient(settings, **iaas),
        blockstorage=oci.core.BlockstorageClient(settings, **iaas),
        work_requests=oci.work_requests.WorkRequestClient(settings, **iaas),
        # the ranged reader retries each part itself: no SDK retries under it
        objects=oci.object_storage.ObjectStorageClient(
            settings, retry_strategy=oci.retry.NoneRetryStrategy(),
            **endpoint(config.objectstorage_endpoint)),
        tenancy=settings["tenancy"])


_CLIENTS: ClientCache[OCIProviderConfig, Clients] = ClientCache(make_clients)


def clients_for(config: OCIProviderConfig) -> Clients:
    """The process's clients for this tenancy and key."""
    return _CLIENTS.get(config)
