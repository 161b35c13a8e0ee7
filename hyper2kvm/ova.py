"""OVA archives: read in place (members by offset, nothing extracted that need not be)
and written as USTAR with the descriptor first, as the OVF spec asks."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.errors import InvalidRequest
from core.files import copy_file, partial_path


@dataclass(frozen=True)
class Member:
    """A file inside an OVA: where its bytes are, without extracting it."""

    name: str
    offset: int
    size: int


def read_members(ova: Path) -> dict[str, Member]:
    """The OVA's files by name; refuses absolute paths, `..`, links and devices."""
    members: dict[str, Member] = {}
    try:
        with tarfile.open(ova, mode="r:") as archive:
            for info in archive:
                path = PurePosixPath(info.name)
                if path.is_absolute() or ".." in path.parts:
                    raise InvalidRequest(f"{ova.name}: member {info.name!r} escapes the archive")
                if not info.isfile():
                    raise InvalidRequest(f"{ova.name}: member {info.name!r} is not a regular file")
                members[info.name] = Member(info.name, info.offset_data, info.size)
    except tarfile.TarError as exc:
        raise InvalidRequest(f"{ova.name} is not a valid OVA (tar) archive: {exc}") from None
    if not any(name.endswith(".ovf") for name in members):
        raise InvalidRequest(f"{ova.name} holds no .ovf descriptor")
    return members


def read_member(ova: Path, member: Member) -> bytes:
    with ova.open("rb") as stream:
        stream.seek(member.offset)
        return stream.read(member.size)


def extract_member(
    ova: Path, member: Member, target: Path, progress: Callable[[int], None] | None = None
) -> None:
    """Copy one member out to `target` (written as a partial file, renamed when done)."""
    try:
        copy_file(ova, target, offset=member.offset, length=member.size, progress=progress)
    except (OSError, EOFError) as exc:
        raise InvalidRequest(f"{ova.name}: member {member.name} cannot be read: {exc}") from None


class _Counting:
    """A file wrapper that reports bytes read."""

    def __init__(self, stream: BinaryIO, progress: Callable[[int], None] | None):
        self._stream = stream
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self._progress and data:
            self._progress(len(data))
        return data


def write_ova(
    target: Path, files: Sequence[Path], progress: Callable[[int], None] | None = None
) -> None:
    """Pack `files` (the .ovf first) into `target`, atomically."""
    ordered = sorted(files, key=lambda f: (f.suffix != ".ovf", f.suffix == ".mf"))
    partial = partial_path(target)
    try:
        with tarfile.open(partial, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for file in ordered:
                info = archive.gettarinfo(str(file), arcname=file.name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with file.open("rb") as stream:
                    archive.addfile(info, _Counting(stream, progress))  # type: ignore[arg-type]
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
