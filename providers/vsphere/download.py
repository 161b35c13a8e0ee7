"""Downloads from a vSphere server's HTTP interfaces (datastore `/folder`, NFC `/nfc`):
streamed under a partial name, hashed on the way, resumed with `Range` after a broken
connection, renamed when complete."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.errors import AuthFailed, NotFound, ProviderError, Transient
from core.files import partial_path

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    resumed: int  # how many times the transfer was picked up again


def _status_error(response: httpx.Response, url: str) -> ProviderError:
    where = url.split("?")[0]
    if response.status_code == 404:
        return NotFound(f"{where}: not found on the server")
    if response.status_code in (401, 403):
        return AuthFailed(f"{where}: HTTP {response.status_code}, access refused")
    if response.status_code >= 500 or response.status_code == 429:
        return Transient(f"{where}: HTTP {response.status_code}")
    return ProviderError(f"{where}: HTTP {response.status_code}")


def download(
    client: httpx.Client,
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
    hasher = hashlib.sha256()
    written = 0
    resumed = 0
    failures = 0
    try:
        with partial.open("wb") as out:
            while True:
                headers = {"Range": f"bytes={written}-"} if written else {}
                try:
                    with client.stream("GET", url, headers=headers) as response:
                        if response.status_code == 416 and written:
                            break  # asked past the end: we already hold every byte
                        if response.status_code not in (200, 206):
                            raise _status_error(response, url)
                        total = _expected_total(response, written)
                        if written and response.status_code == 200:
                            # no Range support: start over (and say so in progress)
                            out.seek(0)
                            out.truncate()
                            hasher = hashlib.sha256()
                            written = 0
                        for chunk in response.iter_raw(chunk_size):
                            out.write(chunk)
                            hasher.update(chunk)
                            written += len(chunk)
                            if progress:
                                progress(len(chunk))
                    if total is not None and written < total:
                        raise httpx.RemoteProtocolError(
                            f"connection closed after {written} of {total} bytes")
                    break
                except httpx.TransportError as exc:
                    failures += 1
                    if failures > retries:
                        raise Transient(f"{url.split('?')[0]}: transfer failed after "
                                        f"{written} bytes and {retries} retries: {exc}") from None
                    resumed += 1
                    time.sleep(min(0.2 * 2 ** failures, 5))
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Downloaded(path=target, size=written, sha256=hasher.hexdigest(), resumed=resumed)


def _expected_total(response: httpx.Response, offset: int) -> int | None:
    """The full file size the response implies, when it says."""
    content_range = response.headers.get("content-range")
    if response.status_code == 206 and content_range:
        match = _CONTENT_RANGE.match(content_range)
        if match and match.group(3) != "*":
            return int(match.group(3))
    length = response.headers.get("content-length")
    if length is None or response.headers.get("content-encoding"):
        return None
    return int(length) + (offset if response.status_code == 206 else 0)
