"""Downloads from a vSphere server's HTTP interfaces (datastore `/folder`, NFC `/nfc`):
streamed under a partial name, hashed on the way, resumed with `Range` after a broken
connection, renamed when complete.

On the standard library's http.client: its buffered `read(n)` fills large blocks in C,
which measured 1.5-2x the throughput of httpx's streaming here (bench/vsphere_export.py)."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import AuthFailed, NotFound, ProviderError, Transient
from core.files import partial_path

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    resumed: int  # how many times the transfer was picked up again


@dataclass(frozen=True)
class HttpSource:
    """How to reach the server's file interfaces: TLS settings and the session cookie."""

    context: ssl.SSLContext
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0

    def connect(self, url: str) -> http.client.HTTPConnection:
        """A connection to `url`'s server (kept open between requests by its user)."""
        parts = urlsplit(url)
        return (http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                            context=self.context, timeout=self.timeout)
                if parts.scheme == "https" else
                http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                           timeout=self.timeout))

    def request(self, connection: http.client.HTTPConnection, url: str,
                headers: dict[str, str]) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target, headers={**self.headers, **headers})
        return connection.getresponse()

    def get(self, url: str, headers: dict[str, str]) -> tuple[
            http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = self.connect(url)
        try:
            return connection, self.request(connection, url, headers)
        except BaseException:
            connection.close()
            raise


def status_error(status: int, url: str) -> ProviderError:
    where = url.split("?")[0]
    if status == 404:
        return NotFound(f"{where}: not found on the server")
    if status in (401, 403):
        return AuthFailed(f"{where}: HTTP {status}, access refused")
    if status >= 500 or status == 429:
        return Transient(f"{where}: HTTP {status}")
    return ProviderError(f"{where}: HTTP {status}")


def download(
    source: HttpSource,
    url: str,
    target: Path,
    *,
    chunk_size: int,
    retries: int,
    progress: Callable[[int], None] | None = None,
) -> Downloaded:
    """GET `url` into `target`. A connection that breaks is retried up to `retries` times,
    each time asking for the remaining bytes only; a server that ignores `Range` is read
    from the start again. Nothing is left under `target` unless the file is complete."""
    partial = partial_path(target)
    # one buffer, reused: a fresh multi-MiB block per read costs page faults
    view = memoryview(bytearray(chunk_size))
    hasher = hashlib.sha256()
    written = 0
    resumed = 0
    failures = 0
    try:
        with partial.open("wb") as out:
            while True:
                headers = {"Range": f"bytes={written}-"} if written else {}
                try:
                    connection, response = source.get(url, headers)
                    try:
                        if response.status == 416 and written:
                            break  # asked past the end: we already hold every byte
                        if response.status not in (200, 206):
                            raise status_error(response.status, url)
                        total = _expected_total(response, written)
                        if written and response.status == 200:
                            # no Range support: start over
                            out.seek(0)
                            out.truncate()
                            hasher = hashlib.sha256()
                            written = 0
                        while count := response.readinto(view):
                            out.write(view[:count])
                            hasher.update(view[:count])
                            written += count
                            if progress:
                                progress(count)
                    finally:
                        connection.close()
                    if total is not None and written < total:
                        raise http.client.IncompleteRead(b"", total - written)
                    break
                except (OSError, http.client.HTTPException) as exc:
                    failures += 1
                    if failures > retries:
                        raise Transient(f"{url.split('?')[0]}: transfer failed after "
                                        f"{written} bytes and {retries} retries: "
                                        f"{exc!r}") from None
                    resumed += 1
                    time.sleep(min(0.2 * 2 ** failures, 5))
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Downloaded(path=target, size=written, sha256=hasher.hexdigest(), resumed=resumed)


def _expected_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The full file size the response implies, when it says."""
    content_range = response.getheader("content-range")
    if response.status == 206 and content_range:
        match = _CONTENT_RANGE.match(content_range)
        if match and match.group(3) != "*":
            return int(match.group(3))
    length = response.getheader("content-length")
    if length is None or response.getheader("content-encoding"):
        return None
    return int(length) + (offset if response.status == 206 else 0)
