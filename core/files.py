"""Moving files without ever leaving a half-written one where a finished one belongs."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

CHUNK = 4 * 1024 * 1024


def partial_path(target: Path) -> Path:
    """The name a file has while it is being written."""
    return target.with_name(f".{target.name}.partial")


def copy_file(src: Path, dst: Path, *, progress: Callable[[int], None] | None = None) -> None:
    """Copy through a partial file renamed at the end."""
    partial = partial_path(dst)
    try:
        with src.open("rb") as reader, partial.open("wb") as writer:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
                if progress:
                    progress(len(chunk))
        os.replace(partial, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


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
