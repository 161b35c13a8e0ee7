"""The SMB share the Hyper-V provider reads disks from (smbprotocol, SMB 3, signed): host
paths mapped onto it, and files read as parallel ranged reads through the shared ranged
reader, each reader on its own connection (one SMB connection runs out of credits under
parallel large reads; several also spread the server's work over its processes). A part
cut off by a dropped connection is read again on a new one."""

from __future__ import annotations

import contextlib
import logging
import ntpath
import queue
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import smbclient
import smbclient.shutil
from smbprotocol.exceptions import SMBAuthenticationError, SMBException, SMBOSError
from smbprotocol.header import NtStatus

from core.config import HyperVProviderConfig
from core.errors import (
    AuthFailed,
    HypersdkError,
    NotFound,
    ProviderError,
    Transient,
)
from providers.objects import read_object
from providers.ranged import RangedFile, Reading

log = logging.getLogger(__name__)


def _normal(path: str) -> str:
    """A Windows path compared as Windows does: backslashes, no trailing one, any case."""
    return path.replace("/", "\\").rstrip("\\").lower()


@dataclass(frozen=True)
class Share:
    server: str
    port: int
    name: str
    host_path: str  # the share's folder as the Hyper-V host names it
    credentials: dict[str, Any]
    connections: Connections

    @classmethod
    def from_config(cls, config: HyperVProviderConfig, connections: Connections) -> Share:
        # callers check that the share is set (export.check_exportable says why when not)
        assert config.export_share is not None
        match = (re.fullmatch(r"\\\\([^\\/]+)\\([^\\/]+)\\?", config.export_share)
                 or re.fullmatch(r"smb://([^/]+)/([^/]+)/?", config.export_share))
        assert match is not None  # the config's validator checked the form
        server, _, port = match.group(1).partition(":")
        unc = f"\\\\{server}\\{match.group(2)}"
        password = config.share_password or config.password
        return cls(server=server, port=int(port or 445), name=match.group(2),
                   host_path=config.share_path or unc,
                   credentials={"username": config.share_username or config.username,
                                "password": password.get_secret_value()},
                   connections=connections)

    @property
    def unc(self) -> str:
        return f"\\\\{self.server}\\{self.name}"

    def relative(self, host_path: str) -> str | None:
        """Where the host's file `host_path` is inside the share (backslashed), or None
        when it is not under the share's folder (nor its UNC)."""
        target = _normal(host_path)
        for root in (_normal(self.host_path), _normal(self.unc)):
            if target.startswith(root + "\\"):
                return host_path.replace("/", "\\")[len(root) + 1:]
        return None

    def host_name(self, relative: str) -> str:
        """The host's name of a path inside the share."""
        return ntpath.join(self.host_path, relative)

    def _path(self, relative: str) -> str:
        return f"{self.unc}\\{relative}"

    @contextlib.contextmanager
    def _connection(self) -> Iterator[dict[str, Any]]:
        """smbclient's arguments for one of our connections, held while in use."""
        with self.connections.borrow() as cache:
            yield {"port": self.port, "connection_cache": cache, **self.credentials}

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._connection() as connection:
                return fn(*args, **connection, **kwargs)
        except Exception as exc:
            raise map_error(exc, what) from None

    def check(self) -> None:
        self._call(f"SMB share {self.unc}", smbclient.listdir, self.unc)

    def remove_tree(self, relative: str) -> None:
        """A folder and all in it removed over our own SMB connection: the host's
        Remove-Item of a file server's path would need a second hop, which its WinRM
        session's NTLM logon cannot make."""
        self._call(f"remove {self._path(relative)}", smbclient.shutil.rmtree,
                   self._path(relative))

    @property
    def remote(self) -> bool:
        """Whether the host reaches the share over the network (its path is a UNC): the
        Hyper-V services then write there as the host's computer account."""
        return self.host_path.startswith("\\\\")

    def remove_file(self, relative: str) -> None:
        self._call(f"remove {self._path(relative)}", smbclient.remove, self._path(relative))

    def size(self, relative: str) -> int:
        return int(self._call(self._path(relative), smbclient.stat, self._path(relative)).st_size)

    def exists(self, relative: str) -> bool:
        try:
            self.size(relative)
        except NotFound:
            return False
        return True

    def read_file(self, relative: str, target: Path, reading: Reading) -> RangedFile:
        """`relative` copied to `target` in parallel parts; its SHA-256 in the result."""
        path = self._path(relative)
        size = self.size(relative)

        def fetch_range(offset: int, length: int) -> bytes:
            try:
                with self._connection() as connection, smbclient.open_file(
                        path, mode="rb", buffering=0, share_access="rwd",
                        **connection) as stream:
                    stream.seek(offset)
                    chunks = []
                    left = length
                    while left:
                        chunk = stream.read(left)
                        if not chunk:
                            break
                        chunks.append(chunk)
                        left -= len(chunk)
                    return b"".join(chunks)
            except Exception as exc:  # noqa: BLE001 - mapped: Transient is retried per part
                raise map_error(exc, f"{path} bytes {offset}-") from None

        result = read_object(target, size=size, fetch_range=fetch_range, reading=reading,
                             what=path)
        log.info("%s: %d bytes read into %s (%d reads retried)", path, result.size,
                 target.name, result.retried)
        return result


class Connections:
    """SMB connections to one share's server, each used by one reader at a time; a
    connection that failed is closed, and made again on its next use."""

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[dict[str, Any]]:
        try:
            cache = self._idle.get_nowait()
        except queue.Empty:
            cache = {}  # smbclient's connection cache: this one connection
        try:
            yield cache
        except SMBOSError:  # the file's error (not found, denied): the connection is fine
            raise
        except BaseException:
            smbclient.reset_connection_cache(fail_on_error=False, connection_cache=cache)
            raise
        finally:
            self._idle.put(cache)


_GONE = {NtStatus.STATUS_OBJECT_NAME_NOT_FOUND, NtStatus.STATUS_OBJECT_PATH_NOT_FOUND,
         NtStatus.STATUS_NO_SUCH_FILE}
_REFUSED = {NtStatus.STATUS_LOGON_FAILURE, NtStatus.STATUS_WRONG_PASSWORD,
            NtStatus.STATUS_PASSWORD_EXPIRED, NtStatus.STATUS_ACCESS_DENIED}


def map_error(exc: BaseException, what: str) -> HypersdkError:
    if isinstance(exc, HypersdkError):
        return exc
    status = getattr(exc, "ntstatus", None)
    if isinstance(exc, SMBAuthenticationError) or status == NtStatus.STATUS_LOGON_FAILURE:
        return AuthFailed(f"{what}: the SMB server refused the share's credentials")
    if status in _REFUSED:
        return AuthFailed(f"{what}: access denied on the share ({NtStatus(status).name})")
    if status in _GONE:
        return NotFound(f"{what}: no such file on the share")
    if isinstance(exc, SMBOSError):
        return ProviderError(f"{what}: {exc.strerror}")
    if isinstance(exc, OSError | SMBException | ValueError):
        # a dropped or refused connection, a connection closed under a read
        return Transient(f"{what}: {type(exc).__name__}: {exc}")
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}")
