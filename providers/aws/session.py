"""boto3 sessions and clients for one AWS account: credentials as configured (key pair,
profile, or boto3's standard chain, then an assumed role), one endpoint for every
service when a compatible cloud is used, and botocore's errors mapped onto
`core.errors` so that tasks know what to retry and the API what to answer."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    Credentials,
    DeferredRefreshableCredentials,
)

from core.config import AWSProviderConfig
from core.errors import (
    AuthFailed,
    HypersdkError,
    NotFound,
    ProviderError,
    Transient,
    retry_after,
)
from providers.clients import ClientCache

_NOT_FOUND = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed",
              "InvalidSnapshot.NotFound", "InvalidVolume.NotFound", "InvalidAMIID.NotFound",
              "ResourceNotFoundException", "NoSuchKey", "NoSuchBucket",
              "InvalidExportTaskID.NotFound", "NotFound", "404"}
_AUTH = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
         "AccessDenied", "AccessDeniedException", "ExpiredToken", "ExpiredTokenException",
         "InvalidAccessKeyId", "UnrecognizedClientException", "OptInRequired", "403"}
_TRANSIENT = {"Throttling", "ThrottlingException", "RequestLimitExceeded",
              "RequestThrottledException", "TooManyRequestsException", "SlowDown",
              "InternalError", "InternalFailure", "InternalServerError", "ServiceUnavailable",
              "ServiceUnavailableException", "Unavailable", "RequestTimeout",
              "RequestTimeoutException", "ConcurrentLimitExceededException"}


def map_error(exc: BaseException, what: str) -> HypersdkError:
    """A botocore error as a hypersdk error whose message says where and what."""
    if isinstance(exc, HypersdkError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or code
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _NOT_FOUND:
            return NotFound(f"{what}: {message}")
        if code in _AUTH or status in (401, 403):
            return AuthFailed(f"{what}: AWS refused the request ({code}: {message})")
        if code in _TRANSIENT or status == 429 or status >= 500:
            return Transient(f"{what}: {code or status}: {message}", retry_after=retry_after(
                exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})))
        return ProviderError(f"{what}: {code}: {message}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError
                  | botocore.exceptions.PartialCredentialsError
                  | botocore.exceptions.ProfileNotFound):
        return AuthFailed(f"{what}: {exc}")
    if isinstance(exc, botocore.exceptions.SSLError):
        return AuthFailed(f"{what}: TLS failure ({exc}); set providers.aws.ca_file")
    if isinstance(exc, botocore.exceptions.EndpointConnectionError
                  | botocore.exceptions.ConnectionClosedError
                  | botocore.exceptions.ReadTimeoutError
                  | botocore.exceptions.ConnectTimeoutError
                  | botocore.exceptions.ResponseStreamingError
                  | botocore.exceptions.IncompleteReadError
                  | ConnectionError | TimeoutError):
        return Transient(f"{what}: cannot reach AWS: {exc}")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return ProviderError(f"{what}: {exc}")
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Clients:
    """The clients one provider uses, all from one credentialed session."""

    ec2: Any
    ebs: Any  # the EBS direct APIs; retries are ours, per block
    s3: Any
    sts: Any
    kms: Any
    region: str


def _session(config: AWSProviderConfig) -> boto3.session.Session:
    if config.access_key_id and config.secret_access_key:
        return boto3.session.Session(
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key.get_secret_value(),
            aws_session_token=(config.session_token.get_secret_value()
                               if config.session_token else None),
            region_name=config.region)
    try:
        return boto3.session.Session(profile_name=config.profile, region_name=config.region)
    except botocore.exceptions.ProfileNotFound as exc:
        raise AuthFailed(f"AWS: {exc}") from None


class _Given(CredentialProvider):  # type: ignore[misc]
    """The one source of a session's credentials: those it was given."""

    METHOD = "assume-role"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


def _assume(session: boto3.session.Session, config: AWSProviderConfig,
            client_config: BotoConfig) -> boto3.session.Session:
    """A session with the role's credentials, assumed again (botocore's own fetcher, as
    for a profile's role_arn) before they expire: STS's last an hour at most, and an
    export can last longer."""
    source = session.get_credentials()
    if source is None:
        raise AuthFailed(f"AWS assume role {config.role_arn}: no credentials to assume it "
                         "with (access_key_id, a profile, or the environment)")
    fetcher = AssumeRoleCredentialFetcher(
        client_creator=functools.partial(session.client, endpoint_url=config.endpoint_url,
                                         config=client_config, verify=_verify(config)),
        source_credentials=source, role_arn=config.role_arn,
        extra_args={"RoleSessionName": "hypersdk"})
    credentials = DeferredRefreshableCredentials(refresh_using=fetcher.fetch_credentials,
                                                 method="assume-role")
    try:
        credentials.get_frozen_credentials()  # assumed now: a refusal is said here, once
    except Exception as exc:  # noqa: BLE001 - mapped
        raise map_error(exc, f"AWS assume role {config.role_arn}") from None
    role_session = botocore.session.Session()
    role_session.register_component("credential_provider", CredentialResolver([
        _Given(credentials)]))
    return boto3.session.Session(botocore_session=role_session, region_name=config.region)


def _verify(config: AWSProviderConfig) -> str | None:
    return str(config.ca_file) if config.ca_file else None


def make_clients(config: AWSProviderConfig, *, pool_size: int) -> Clients:
    """Clients for the configured account; `pool_size` connections per client, so that
    parallel block reads are not queued behind botocore's default of 10."""
    api = BotoConfig(retries={"mode": "standard", "total_max_attempts": 5},
                     max_pool_connections=pool_size, user_agent_extra="hypersdk")
    # block reads are retried by the ranged reader, one block at a time, with backoff
    data = BotoConfig(retries={"mode": "standard", "total_max_attempts": 1},
                      max_pool_connections=pool_size, user_agent_extra="hypersdk",
                      read_timeout=120)
    session = _session(config)
    if config.role_arn:
        session = _assume(session, config, api)
    endpoint, verify = config.endpoint_url, _verify(config)
    return Clients(
        ec2=session.client("ec2", endpoint_url=endpoint, config=api, verify=verify),
        ebs=session.client("ebs", endpoint_url=endpoint, config=data, verify=verify),
        s3=session.client("s3", endpoint_url=endpoint, config=data, verify=verify),
        sts=session.client("sts", endpoint_url=endpoint, config=api, verify=verify),
        kms=session.client("kms", endpoint_url=endpoint, config=api, verify=verify),
        region=config.region)


_CLIENTS: ClientCache[AWSProviderConfig, Clients] = ClientCache(make_clients)


def clients_for(config: AWSProviderConfig, *, pool_size: int) -> Clients:
    """The process's clients for this account and these credentials (boto3 clients are
    thread-safe and keep their connection pools; an assumed role's credentials renew
    themselves)."""
    return _CLIENTS.get(config, pool_size=pool_size)


def call(fn: Any, what: str, /, **kwargs: Any) -> Any:
    """One API call, its errors mapped."""
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - mapped
        raise map_error(exc, what) from None
