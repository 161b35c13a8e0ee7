"""OVF manifests (`.mf`): `SHA256(file)= hex` lines, read, written and checked."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from core.errors import VerificationError
from core.files import iter_chunks

_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")


def parse_manifest(text: str) -> dict[str, tuple[str, str]]:
    """{file name: (algorithm, hex digest)}; refuses lines it does not understand."""
    entries: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if not match:
            raise VerificationError(f"manifest line {number} is not 'ALGO(file)= digest': {line!r}")
        algorithm, name, digest = match.groups()
        entries[name] = (algorithm.lower(), digest.lower())
    return entries


def render_manifest(digests: Iterable[tuple[str, str]]) -> str:
    """Manifest text for (file name, sha256 hex) pairs."""
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in digests)


def digest_stream(
    stream: BinaryIO,
    *,
    algorithm: str = "sha256",
    length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Hash a stream (up to `length` bytes), reporting bytes as it goes."""
    hasher = hashlib.new(algorithm)
    try:
        for chunk in iter_chunks(stream, length):
            hasher.update(chunk)
            if progress:
                progress(len(chunk))
    except EOFError as exc:
        raise VerificationError(f"file too short: {exc}") from None
    return hasher.hexdigest()


def digest_file(
    path: Path,
    *,
    algorithm: str = "sha256",
    offset: int = 0,
    length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    with path.open("rb") as stream:
        stream.seek(offset)
        return digest_stream(stream, algorithm=algorithm, length=length, progress=progress)
