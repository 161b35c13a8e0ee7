"""Downloading one object that a cloud exported (an S3 export task's OVA, a GCS or OCI
Object Storage image export): parallel ranged reads through the shared ranged reader,
checked against the checksum the object store gives (CRC32C, MD5) where it gives one."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import VerificationError
from providers.ranged import Part, RangedFile, Reading, Updatable, read_ranges


@dataclass
class Expected:
    """A checksum the store gave for the object, and the running one that must match."""

    name: str  # crc32c, md5
    value: bytes
    running: Updatable = field(repr=False)

    @classmethod
    def from_base64(cls, name: str, value: str, running: Updatable) -> Expected:
        return cls(name=name, value=base64.b64decode(value), running=running)

    def check(self, what: str) -> None:
        actual: bytes = self.running.digest()  # type: ignore[attr-defined]
        if actual != self.value:
            raise VerificationError(
                f"{what}: {self.name} {base64.b64encode(actual).decode()} of what arrived does "
                f"not match the store's {base64.b64encode(self.value).decode()}")


def read_object(target: Path, *, size: int, fetch_range: Callable[[int, int], bytes],
                reading: Reading, what: str, expected: list[Expected] | None = None,
                source: str | None = None) -> RangedFile:
    """Fill `target` with the object's `size` bytes, `reading.part_size` at a time read by
    `fetch_range(offset, length)`; every checksum in `expected` checked (VerificationError,
    and nothing left under `target`, when one does not match). `source` names this version
    of the object (its ETag, generation): a read that fails transiently is resumed."""
    step = reading.part_size
    parts = (Part(offset=o, length=min(step, size - o)) for o in range(0, size, step))
    checks = expected or []
    result = read_ranges(target, size=size, parts=parts,
                         fetch=lambda part: fetch_range(part.offset, part.length),
                         concurrency=reading.part_concurrency, retries=reading.retries,
                         progress=reading.progress, what=what,
                         also_hash=[c.running for c in checks], stop=reading.stop,
                         budget=reading.budget, source=source)
    try:
        for check in checks:
            check.check(what)
    except VerificationError:
        target.unlink(missing_ok=True)
        raise
    return result
