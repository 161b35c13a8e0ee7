"""Moving files without ever leaving a half-written one where a finished one belongs."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 4 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function  # type: ignore[no-any-return]


_sync_range = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing this range of the file to disk now, without waiting for it (Linux
    sync_file_range, which `os` lacks). A large download written only into the page cache
    is throttled by the kernel once dirty pages pile up and leaves its final fsync a
    long wait; started early, both go ~3x faster here (1 GiB: 3.6 s -> 0.5 s)."""
    if _sync_range is not None:
        _sync_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def partial_path(target: Path) -> Path:
    """The name a file has while it is being written."""
    return target.with_name(f".{target.name}.partial")


def side_file(target: Path, kind: str) -> Path:
    """A file kept beside `target` while it is written (named like a partial file, so
    that what removes a failed job's partial files removes it too)."""
    return target.with_name(f".{target.name}.{kind}.partial")


def side_files(target: Path) -> list[Path]:
    """Every `side_file` of `target`."""
    return list(target.parent.glob(f".{target.name}.*.partial"))


def iter_chunks(reader: BinaryIO, length: int | None = None) -> Iterator[bytes]:
    """The stream's bytes in chunks: all of them, or exactly `length` (EOFError if fewer)."""
    remaining = length
    while remaining is None or remaining > 0:
        chunk = reader.read(CHUNK if remaining is None else min(CHUNK, remaining))
        if not chunk:
            if remaining:
                raise EOFError(f"{remaining} bytes missing at the end")
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def copy_file(
    src: Path,
    dst: Path,
    *,
    offset: int = 0,
    length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy `src` (or `length` bytes of it from `offset`) through a partial file renamed
    at the end."""
    partial = partial_path(dst)
    try:
        with src.open("rb") as reader, partial.open("wb") as writer:
            reader.seek(offset)
            for chunk in iter_chunks(reader, length):
                writer.write(chunk)
                if progress:
                    progress(len(chunk))
        os.replace(partial, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def remove_partials(folder: Path) -> None:
    """Delete what an interrupted writer left in `folder` (`.*.partial` files and staging
    folders), and the folder itself if that leaves it empty."""
    if not folder.is_dir():
        return
    for leftover in folder.glob(".*.partial"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def link_or_copy(
    src: Path, dst: Path, *, progress: Callable[[int], None] | None = None
) -> bool:
    """Hard-link `src` to `dst` where both are on one file system (no bytes move), copy
    otherwise. Returns whether it linked. An existing `dst` is replaced."""
    partial = partial_path(dst)
    partial.unlink(missing_ok=True)
    try:
        os.link(src, partial)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        copy_file(src, dst, progress=progress)
        return False
    os.replace(partial, dst)
    if progress:
        progress(src.stat().st_size)
    return True


def make_durable(folder: Path) -> None:
    """Wait until every file and directory under `folder` (and `folder` itself) is on
    stable storage, so that what is written next (a "completed" marker) never survives a
    power cut that the data before it did not."""
    for directory, _subdirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def private_folder(path: Path, mode: int = 0o700) -> Path:
    """A folder only its owner can list (created so; an existing one tightened)."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != mode:
        path.chmod(mode)
    return path


def private_file(path: Path) -> Path:
    """An existing or empty file readable by its owner only: created 0600 from the start
    (no window in which another user could open it), an existing one tightened."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o777 != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a secret to a 0600 file, atomically (a reader sees all of it or none)."""
    partial = partial_path(path)
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename or a new entry is durable once its
    directory is)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ZERO_PROBE = bytes(4096)


def all_zeros(data: bytes) -> bool:
    """Whether `data` is all zero bytes (a hole to leave unwritten). Data is told by its
    first bytes (no scan of the rest); only what starts with 4 KiB of zeros is counted
    through."""
    return data[:4096] == _ZERO_PROBE[:min(4096, len(data))] and data.count(0) == len(data)
