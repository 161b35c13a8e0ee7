"""Sessions with a vCenter or ESXi: TLS as configured, a pool of logged-in sessions
shared by every provider object of the process, re-login when a session expired, and
pyVmomi's faults mapped onto `core.errors`."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.client
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from core.config import VSphereProviderConfig
from core.errors import AuthFailed, HypersdkError, NotFound, ProviderError, Transient, Unsupported

T = TypeVar("T")
DEFAULT_PORT = 443


def split_host(host: str) -> tuple[str, int]:
    """'vc.example.com', 'vc:8443', '[::1]:8989' → (host, port)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") else DEFAULT_PORT
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, int(port)
    return host, DEFAULT_PORT


def normalize_thumbprint(value: str) -> str:
    return value.replace(":", "").replace(" ", "").lower()


def tls_context(config: VSphereProviderConfig) -> ssl.SSLContext:
    """Verify against the system CAs, a CA file, or (insecure/thumbprint) not at all —
    a thumbprint is then checked on the peer certificate by `check_thumbprint`."""
    if config.insecure or config.thumbprint:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)


def check_thumbprint(config: VSphereProviderConfig) -> None:
    """With a configured thumbprint, the server's certificate must have it (SHA-1 as
    vSphere shows it, or SHA-256)."""
    if not config.thumbprint:
        return
    host, port = split_host(config.host)
    try:
        with (
            socket.create_connection((host, port), timeout=30) as raw,
            tls_context(config).wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True) or b""
    except OSError as exc:
        raise Transient(f"vSphere {config.host}: cannot connect: {exc}") from None
    expected = normalize_thumbprint(config.thumbprint)
    seen = {hashlib.sha1(der).hexdigest(), hashlib.sha256(der).hexdigest()}  # noqa: S324
    if expected not in seen:
        raise AuthFailed(f"vSphere {config.host}: server certificate does not match the "
                         "configured thumbprint")


def map_fault(exc: BaseException, what: str) -> HypersdkError:
    """pyVmomi faults and socket errors as hypersdk errors, with a message that says
    which server and what went wrong."""
    if isinstance(exc, HypersdkError):
        return exc
    if isinstance(exc, vim.fault.InvalidLogin | vim.fault.NoPermission):
        return AuthFailed(f"{what}: {getattr(exc, 'msg', '') or type(exc).__name__}")
    if isinstance(exc, vmodl.fault.ManagedObjectNotFound):
        return NotFound(f"{what}: the object no longer exists")
    if isinstance(exc, vmodl.fault.MethodNotFound):
        return Unsupported(f"{what}: not supported by this server ({exc.method or 'method'} "
                           "is not implemented)")
    if isinstance(exc, vim.fault.InvalidPowerState):
        return ProviderError(f"{what}: the VM is {exc.existingState}, it must be "
                             f"{exc.requestedState}")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return AuthFailed(f"{what}: TLS failure ({exc}); set insecure, ca_file or thumbprint")
    if isinstance(exc, vim.fault.NotAuthenticated):
        return Transient(f"{what}: session not authenticated")
    if isinstance(exc, OSError | http.client.HTTPException):
        return Transient(f"{what}: cannot reach the server: {exc}")
    if isinstance(exc, vmodl.MethodFault):
        return ProviderError(f"{what}: {getattr(exc, 'msg', None) or type(exc).__name__}")
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}")


class Session:
    """One logged-in connection (a pyVmomi ServiceInstance)."""

    def __init__(self, config: VSphereProviderConfig) -> None:
        self.config = config
        self.instance = self._login()

    def _login(self) -> Any:
        config = self.config
        host, port = split_host(config.host)
        check_thumbprint(config)
        try:
            return SmartConnect(host=host, port=port, user=config.username,
                                pwd=config.password.get_secret_value(),
                                sslContext=tls_context(config), httpConnectionTimeout=60,
                                connectionPoolTimeout=-1)
        except vim.fault.InvalidLogin:
            raise AuthFailed(f"vSphere {config.host}: login refused for user "
                             f"{config.username!r} (check username and password)") from None
        except BaseException as exc:
            raise map_fault(exc, f"vSphere {config.host}") from None

    def relogin(self) -> None:
        with contextlib.suppress(Exception):
            Disconnect(self.instance)
        self.instance = self._login()

    @property
    def content(self) -> Any:
        return self.instance.RetrieveContent()

    @property
    def cookie(self) -> str:
        """The session cookie, for the datastore and NFC HTTP interfaces."""
        return str(self.instance._stub.cookie)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run a SOAP call; a session that expired is logged in again, once."""
        try:
            return fn()
        except vim.fault.NotAuthenticated:
            self.relogin()
        except BaseException as exc:
            raise map_fault(exc, what) from None
        try:
            return fn()
        except BaseException as exc:
            raise map_fault(exc, what) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            Disconnect(self.instance)


class SessionPool:
    """At most `connection_pool_size` sessions with one server, created when needed and
    kept for the life of the process."""

    def __init__(self, config: VSphereProviderConfig) -> None:
        self.config = config
        self._idle: queue.LifoQueue[Session] = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()
        self._all: list[Session] = []

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        session = self._take()
        try:
            yield session
        finally:
            self._idle.put(session)

    def _take(self) -> Session:
        with contextlib.suppress(queue.Empty):
            return self._idle.get_nowait()
        with self._lock:
            create = self._created < self.config.connection_pool_size
            if create:
                self._created += 1
        if not create:
            return self._idle.get()
        try:
            session = Session(self.config)
        except BaseException:
            with self._lock:
                self._created -= 1
            raise
        self._all.append(session)
        return session

    def close(self) -> None:
        for session in self._all:
            session.close()
        self._all.clear()


_POOLS: dict[tuple[str, str, str, bool, str, str], SessionPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(config: VSphereProviderConfig) -> SessionPool:
    """The process's pool for this server and these credentials."""
    secret = hashlib.sha256(config.password.get_secret_value().encode()).hexdigest()
    key = (config.host, config.username, secret, config.insecure, str(config.ca_file),
           config.thumbprint or "")
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = SessionPool(config)
        return _POOLS[key]


@atexit.register
def _logout_all() -> None:
    for pool in _POOLS.values():
        pool.close()
