"""The errors hypersdk raises, one tree for every room.

    HypersdkError
    ├── ConfigError            config file missing, malformed or invalid
    ├── InvalidRequest         a job or request that cannot be carried out as asked
    │   └── PathNotAllowed     a path outside the roots it must stay under
    ├── JobNotFound            no job with that id
    ├── Conflict               not possible in the object's current state (cancel a finished job)
    │   └── UpstreamFailed     a job this one runs after (`after`) did not complete
    ├── ProviderError          anything a source platform says
    │   ├── NotFound           the VM (or other object) does not exist
    │   ├── AuthFailed         credentials refused
    │   ├── Transient          worth retrying: timeouts, dropped connections, busy
    │   └── Unsupported        the platform or this driver cannot do that verb
    ├── VerificationError      a file's checksum or size is not what the manifest says
    ├── ConversionError        qemu-img refused or failed
    │   ├── GuestNotConvertible   guest conversion found no OS it can convert
    │   └── StaleCopy          a warm copy no round can continue (what it matched is gone)
    └── RegistrationError      libvirt refused the domain
        └── DomainExists       a domain of that name is already defined

Tasks retry `Transient` only; the API maps the tree to status codes in one handler.
"""

from __future__ import annotations


class HypersdkError(Exception):
    """Base of every error hypersdk raises on purpose."""


class ConfigError(HypersdkError):
    """The configuration cannot be used; the message names the key and the problem."""


class InvalidRequest(HypersdkError):
    """A request that cannot be carried out as asked."""


class PathNotAllowed(InvalidRequest):
    """A path that resolves outside the root it must stay under."""


class JobNotFound(HypersdkError):
    """No job with that id."""


class Conflict(HypersdkError):
    """The request does not fit the object's current state."""


class UpstreamFailed(Conflict):
    """A job this one was to run after did not complete."""


class ProviderError(HypersdkError):
    """An error reported by a source platform."""


class NotFound(ProviderError):
    """The VM or object asked for does not exist."""


class AuthFailed(ProviderError):
    """The platform refused the credentials."""


class Transient(ProviderError):
    """A failure worth retrying; `retry_after`: seconds the service asked to wait
    (Retry-After), where it said."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after(headers: object) -> float | None:
    """A response's Retry-After in seconds (the delay form; an HTTP date is ignored)."""
    getter = getattr(headers, "get", None)
    value = (getter("retry-after") or getter("Retry-After")) if getter else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


class Unsupported(ProviderError):
    """The platform or its driver cannot do this."""


class VerificationError(HypersdkError):
    """A file does not match its manifest."""


class ConversionError(HypersdkError):
    """Disk conversion failed."""


class GuestNotConvertible(ConversionError):
    """Guest conversion found no operating system on the disks, or one it cannot convert:
    a data-only VM, an appliance, a BSD, a bare boot sector."""


class StaleCopy(ConversionError):
    """A warm migration's copy that no round can bring up to date: what it was compared
    with (the last round's snapshots or changeIds) is gone. The precopy starts over."""


class RegistrationError(HypersdkError):
    """libvirt refused to define or start the domain."""


class DomainExists(RegistrationError):
    """A libvirt domain of that name is already defined."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed step is worth another try."""
    return isinstance(exc, Transient | TimeoutError | ConnectionError)
