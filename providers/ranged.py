"""The one ranged reader: a disk or object fetched as parts read in parallel at their
offsets into a sparse file. Shared by every source that serves byte ranges (EBS
snapshot blocks, S3/GCS/OCI objects, Azure page ranges, a datastore's files).

* Parts are fetched by a pool of threads, a bounded window ahead of the oldest one, so
  memory stays at `window` parts whatever the disk's size.
* Each part is retried on its own (`Transient`, a checksum that does not match) with
  exponential backoff: a cut connection costs that part, not the disk. A service that
  throttles or is busy is waited out (its Retry-After honoured) for up to `budget`
  seconds per part, past the retry count: the export goes on where it was.
* Regions no part covers, and parts that are all zeros, are never written: they stay
  holes of the sparse file.
* The SHA-256 of the whole file (holes as zeros) is computed in order, in the calling
  thread, while later parts are still downloading: no second read of the file.
* Nothing is left under the target's name unless every part arrived. A read of a named,
  unchanging `source` (a snapshot, an exported object) that fails transiently keeps its
  partial file and a resume mark (how far the parts arrived in order, and the SHA-256 of
  that prefix): the task's retry reads that prefix from the disk, checked against the
  mark, and fetches only the rest. Any other failure removes both. A finished read leaves
  its mark too (the whole file), for `keep_for_retry` (the export failed after it).
* A reading's `stop` event, set when the export is abandoned (a cancel's signal raised
  in the flow's main thread while disks are read in pool threads), stops every reader
  of it at its next part: a thread pool's workers are joined at exit, so a reader left
  running would finish a file after the run was cancelled.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from core.config import ExportConfig
from core.errors import Transient, VerificationError, is_transient
from core.files import all_zeros, partial_path, start_writeback

log = logging.getLogger(__name__)

_ZEROS = bytes(1 << 20)
WINDOW_BYTES = 256 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """One range of the target: where it goes, how long it is, and whatever the source
    needs to fetch it (a block index and token, a range of an object)."""

    offset: int
    length: int
    key: Any = None


@dataclass(frozen=True)
class Reading:
    """How one export reads its disks: where to, how many disks and parts at once, part
    size, retries per part, and whom to tell about bytes."""

    dest: Path
    disk_concurrency: int
    part_concurrency: int
    part_size: int
    retries: int
    progress: Callable[[int], None] | None
    stop: threading.Event = field(default_factory=threading.Event, compare=False)
    budget: float = 0.0  # seconds a part keeps being retried while the service is busy

    @classmethod
    def from_settings(cls, dest: Path, export: ExportConfig,
                      progress: Callable[[int], None] | None) -> Reading:
        return cls(dest=dest, disk_concurrency=export.disk_concurrency,
                   part_concurrency=export.part_concurrency, part_size=export.chunk_size,
                   retries=export.part_retries, progress=progress,
                   budget=export.throttle_budget)


@dataclass(frozen=True)
class RangedFile:
    path: Path
    size: int
    sha256: str
    fetched: int  # bytes the parts fetched now held; the rest of the file was never read
    retried: int  # part fetches that failed and were tried again
    resumed: int = 0  # bytes of the file an earlier, failed read had already fetched


Fetch = Callable[[Part], bytes]


class Updatable(Protocol):
    """A running checksum (hashlib's, google-crc32c's)."""

    def update(self, data: bytes, /) -> Any: ...


class _Retries:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


def submit_in_context(pool: Executor, fn: Callable[..., T], *args: Any) -> Future[T]:
    """`pool.submit` in a copy of the caller's context variables, so that what runs in
    the pool's threads logs to the caller's Prefect run too."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


def map_in_context(fn: Callable[[Any], T], items: list[Any], *, workers: int,
                   stop: threading.Event | None = None) -> list[T]:
    """`fn` over `items`, `workers` at once, each in a copy of the caller's context (see
    `submit_in_context`); results in the items' order, the first error raised. On any
    error or signal `stop` is set first, so that the items still running end early."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [submit_in_context(pool, fn, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            if stop is not None:
                stop.set()
            for future in futures:
                future.cancel()
            raise


def with_retries(call: Callable[[], T], *, retries: int, what: str, budget: float = 0.0,
                 stop: threading.Event | None = None, retried: _Retries | None = None) -> T:
    """`call()`, tried again with exponential backoff after a `Transient` failure or a
    checksum that does not match: `retries` times, and a `Transient` one also while less
    than `budget` seconds have passed since the first failure (a service that throttles
    or is busy; its Retry-After honoured). A set `stop` ends the wait."""
    failures = 0
    first_failure = 0.0
    while True:
        try:
            return call()
        except (Transient, VerificationError) as exc:
            failures += 1
            now = time.monotonic()
            first_failure = first_failure or now
            left = first_failure + budget - now if isinstance(exc, Transient) else 0.0
            if failures > retries and left <= 0:
                raise
            if retried is not None:
                retried.add()
            asked = exc.retry_after if isinstance(exc, Transient) else None
            delay = asked if asked is not None else (
                min(0.2 * 2 ** min(failures, 16), 10) * (0.5 + random.random()))  # noqa: S311
            if failures > retries:
                delay = min(delay, left)
            log.info("%s failed (%s); retry %d in %.1f s", what, exc, failures, delay)
            if stop is not None and stop.wait(delay):
                raise Transient(f"{what}: stopped") from None
            if stop is None:
                time.sleep(delay)


def _whole_part(fetch: Fetch, part: Part, what: str) -> bytes:
    data = fetch(part)
    if len(data) != part.length:
        raise Transient(f"{what}: part at {part.offset} came back with {len(data)} bytes, "
                        f"{part.length} expected")
    return data


class _InOrderHash:
    """SHA-256 of the file as parts arrive in offset order, holes hashed as zeros; the
    same walk reports progress."""

    def __init__(self, progress: Callable[[int], None] | None,
                 also: Sequence[Updatable] = ()) -> None:
        self.hasher = hashlib.sha256()
        self.hashers = [self.hasher, *also]
        self.position = 0
        self.progress = progress

    def _zeros(self, end: int) -> None:
        gap = end - self.position
        while self.position < end:
            step = min(end - self.position, len(_ZEROS))
            for hasher in self.hashers:
                hasher.update(_ZEROS[:step])
            self.position += step
        if gap and self.progress:
            self.progress(gap)

    def add(self, part: Part, data: bytes) -> None:
        self._zeros(part.offset)
        for hasher in self.hashers:
            hasher.update(data)
        self.position += len(data)
        if self.progress:
            self.progress(len(data))

    def finish(self, size: int) -> str:
        self._zeros(size)
        return self.hasher.hexdigest()


def resume_mark(target: Path) -> Path:
    """Where a failed read of `target` says how far it got (a partial name: whatever
    removes a job's partial files removes it too)."""
    return target.with_name(f".{target.name}.resume.partial")


def keep_for_retry(paths: list[Path], failure: BaseException) -> None:
    """What an export wrote, after it failed. A transient failure's retry takes up every
    read that has a resume mark: a finished one goes back under its partial name (its
    parts are then read from the disk, checked), an unfinished one stays as it is. All
    else is removed, partial files and marks too."""
    for path in paths:
        mark = resume_mark(path)
        if is_transient(failure) and mark.exists():
            if path.exists():
                os.replace(path, partial_path(path))
            continue
        for leftover in (path, partial_path(path), mark):
            leftover.unlink(missing_ok=True)


def forget_resume_marks(paths: list[Path]) -> None:
    """The export finished: no retry will resume what it read."""
    for path in paths:
        resume_mark(path).unlink(missing_ok=True)


def _resume_point(partial: Path, mark: Path, *, source: str, size: int, what: str) -> int:
    """How many bytes of `partial` an earlier read of the same `source` fetched in order
    and that are still what it fetched (their SHA-256 as the mark says); 0 if none."""
    try:
        recorded = json.loads(mark.read_text())
        position = int(recorded["position"])
        if (recorded.get("source") != source or int(recorded.get("size", -1)) != size
                or partial.stat().st_size != size or not 0 < position <= size):
            return 0
        hasher = hashlib.sha256()
        with partial.open("rb") as stream:
            left = position
            while left:
                chunk = stream.read(min(left, 8 << 20))
                if not chunk:
                    return 0
                hasher.update(chunk)
                left -= len(chunk)
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if hasher.hexdigest() != recorded.get("sha256"):
        log.warning("%s: the earlier attempt's partial file changed; reading it all again", what)
        return 0
    return position


def _write_mark(mark: Path, *, source: str, size: int, position: int, sha256: str) -> None:
    """Record that the first `position` bytes of a read of `source` are on the disk (the
    caller has synced them) and hash to `sha256`."""
    mark.write_text(json.dumps({"source": source, "size": size, "position": position,
                                "sha256": sha256}))


def read_ranges(
    target: Path,
    *,
    size: int,
    parts: Iterable[Part],
    fetch: Fetch,
    concurrency: int,
    retries: int,
    progress: Callable[[int], None] | None = None,
    what: str = "",
    also_hash: Sequence[Updatable] = (),
    stop: threading.Event | None = None,
    budget: float = 0.0,
    source: str | None = None,
) -> RangedFile:
    """Fill `target` (`size` bytes) with `parts` (sorted by offset, not overlapping),
    each fetched by `fetch`. Progress counts every byte of the file once: a part's bytes
    and the hole before it, as the in-order hash passes them; `also_hash` are fed the
    same bytes in the same order (a checksum the source gives to check against). Once
    `stop` is set, no part starts and the read fails. `source` names what the parts come
    from, if it never changes: a transient failure then leaves what arrived for the next
    read of the same source to resume from."""
    what = what or target.name
    partial = partial_path(target)
    mark = resume_mark(target)
    retried = _Retries()
    digest = _InOrderHash(progress, also_hash)
    written = 0
    end = 0
    window = 0  # parts in flight or held for the in-order hash; sized at the first part
    stop = stop or threading.Event()
    resume_from = (_resume_point(partial, mark, source=source, size=size, what=what)
                   if source else 0)
    if resume_from:
        log.info("%s: resuming after the %d bytes an earlier attempt read", what, resume_from)
    mark.unlink(missing_ok=True)  # used (or not usable): a failure now writes its own
    kept = False
    resumed = 0

    def fetch_and_write(fd: int, part: Part) -> bytes:
        if stop.is_set():
            raise Transient(f"{what}: stopped")
        if part.offset + part.length <= resume_from:  # on the disk, checked against the mark
            return os.pread(fd, part.length, part.offset)
        data = with_retries(lambda: _whole_part(fetch, part, what), retries=retries,
                            what=f"{what}: part at {part.offset}", budget=budget, stop=stop,
                            retried=retried)
        if not all_zeros(data):  # all zeros: leave the hole
            os.pwrite(fd, data, part.offset)
            start_writeback(fd, part.offset, len(data))
        return data

    def consume(item: tuple[Part, Future[bytes]]) -> int:
        nonlocal resumed
        part, future = item
        data = future.result()
        digest.add(part, data)
        if part.offset + part.length <= resume_from:
            resumed += len(data)
        return len(data)

    try:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, resume_from)  # what follows the checked prefix: holes again
            os.ftruncate(fd, size)
            with ThreadPoolExecutor(max_workers=concurrency,
                                    thread_name_prefix="ranged") as pool:
                pending: deque[tuple[Part, Future[bytes]]] = deque()
                try:
                    for part in parts:
                        if stop.is_set():
                            raise Transient(f"{what}: stopped")
                        if part.offset < end or part.offset + part.length > size:
                            raise ValueError(f"{what}: part at {part.offset} overlaps another "
                                             "or runs past the end")
                        end = part.offset + part.length
                        # deep enough that a slow part stalls none, within WINDOW_BYTES
                        window = window or min(concurrency * 8, max(
                            concurrency * 2, WINDOW_BYTES // max(part.length, 1)))
                        pending.append((part, submit_in_context(pool, fetch_and_write, fd,
                                                                part)))
                        while len(pending) >= window:
                            written += consume(pending.popleft())
                    while pending:
                        written += consume(pending.popleft())
                except BaseException:
                    stop.set()  # parts already running finish; none start
                    for _, future in pending:
                        future.cancel()
                    raise
            sha256 = digest.finish(size)
            os.fsync(fd)
        except BaseException as exc:
            if source and is_transient(exc) and digest.position:
                os.fdatasync(fd)
                _write_mark(mark, source=source, size=size, position=digest.position,
                            sha256=digest.hasher.copy().hexdigest())
                kept = True
                log.info("%s: %d bytes kept for the next attempt", what, digest.position)
            raise
        finally:
            os.close(fd)
        os.replace(partial, target)
        if source:  # a retry of a later step's failure may take the whole file back
            _write_mark(mark, source=source, size=size, position=size, sha256=sha256)
    except BaseException:
        if not kept:
            partial.unlink(missing_ok=True)
            mark.unlink(missing_ok=True)
        raise
    return RangedFile(path=target, size=size, sha256=sha256, fetched=written - resumed,
                      retried=retried.count, resumed=resumed)
