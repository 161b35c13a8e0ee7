"""Keeping user-given paths inside the roots they belong to."""

from __future__ import annotations

import os
import re
from pathlib import Path

from core.errors import PathNotAllowed

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
PATH_MAX = 4096  # bytes, the terminating NUL included (Linux)
NAME_MAX = 255  # bytes of one path component


def within_os_limits(value: str) -> str:
    """`value` unless no OS could open it: a NUL, over PATH_MAX, or a component over
    NAME_MAX (ValueError saying which, so a request is refused before anything runs)."""
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL character")
    encoded = value.encode("utf-8", "surrogateescape")
    if len(encoded) >= PATH_MAX:
        raise ValueError(f"path of {len(encoded)} bytes is over the limit of {PATH_MAX - 1}")
    for part in value.split("/"):
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise ValueError(f"path component {part[:32]!r}... is over {NAME_MAX} bytes")
    return value


def confine(path: str | os.PathLike[str], root: Path, *, what: str = "path") -> Path:
    """Resolve `path` (relative paths against `root`) and refuse it unless it stays under
    `root` once `..` and symlinks are resolved."""
    root_real = Path(os.path.realpath(root))
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root_real / candidate
    resolved = Path(os.path.realpath(candidate))
    if resolved != root_real and root_real not in resolved.parents:
        raise PathNotAllowed(f"{what} {str(path)!r} is outside {root}")
    return resolved


def confine_any(path: str | os.PathLike[str], roots: list[Path], *, what: str = "path") -> Path:
    """`path` resolved and inside one of `roots` (an absolute path is required)."""
    if not Path(path).is_absolute():
        raise PathNotAllowed(f"{what} {str(path)!r} must be absolute")
    for root in roots:
        try:
            return confine(path, root, what=what)
        except PathNotAllowed:
            continue
    allowed = ", ".join(str(r) for r in roots)
    raise PathNotAllowed(f"{what} {str(path)!r} is outside the configured roots ({allowed})")


def safe_name(name: str) -> str:
    """A file-system-safe form of a VM name."""
    cleaned = _SAFE_NAME.sub("_", name).strip("._")
    return cleaned or "vm"
