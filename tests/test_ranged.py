"""The ranged reader resumes a transiently failed read of the same source, and only when
what the earlier attempt left on the disk is still what it read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from core.errors import Transient, VerificationError
from core.files import partial_path
from providers.ranged import Part, RangedFile, keep_for_retry, read_ranges, resume_mark

PART = 64 << 10
DATA = os.urandom(PART * 12)
PARTS = [Part(offset=o, length=PART) for o in range(0, len(DATA), PART)]


class Source:
    """Serves DATA's parts; after `fail_after` parts every fetch fails with `error`."""

    def __init__(self, *, fail_after: int | None = None,
                 error: Exception | None = None) -> None:
        self.fetched: list[int] = []
        self.fail_after = fail_after
        self.error = error or Transient("busy")

    def __call__(self, part: Part) -> bytes:
        if self.fail_after is not None and len(self.fetched) >= self.fail_after:
            raise self.error
        self.fetched.append(part.offset)
        return DATA[part.offset:part.offset + part.length]


def _read(target: Path, source: Source, name: str = "snap-1") -> RangedFile:
    return read_ranges(target, size=len(DATA), parts=iter(PARTS), fetch=source,
                       concurrency=1, retries=0, source=name)


def test_a_transient_failure_is_resumed_fetching_only_the_missing_parts(tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    with pytest.raises(Transient):
        _read(target, Source(fail_after=5))
    assert not target.exists()
    mark = json.loads(resume_mark(target).read_text())
    assert mark["position"] == 5 * PART
    assert mark["sha256"] == hashlib.sha256(DATA[:5 * PART]).hexdigest()

    again = Source()
    result = _read(target, again)
    assert again.fetched == [p.offset for p in PARTS[5:]]  # the first five from the disk
    assert target.read_bytes() == DATA
    assert result.sha256 == hashlib.sha256(DATA).hexdigest()
    assert result.resumed == 5 * PART
    assert not partial_path(target).exists()


def test_a_partial_file_changed_since_is_read_again_from_the_start(tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    with pytest.raises(Transient):
        _read(target, Source(fail_after=5))
    with partial_path(target).open("r+b") as stream:  # one byte of the kept prefix flipped
        stream.seek(PART + 7)
        byte = stream.read(1)
        stream.seek(PART + 7)
        stream.write(bytes([byte[0] ^ 0xFF]))
    again = Source()
    _read(target, again)
    assert again.fetched == [p.offset for p in PARTS]
    assert target.read_bytes() == DATA


def test_another_source_is_never_resumed_from_this_ones_parts(tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    with pytest.raises(Transient):
        _read(target, Source(fail_after=5), name="snap-1")
    again = Source()
    _read(target, again, name="snap-2")
    assert again.fetched == [p.offset for p in PARTS]


def test_a_failure_that_is_not_transient_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    with pytest.raises(VerificationError):
        _read(target, Source(fail_after=5, error=VerificationError("checksum")))
    assert list(tmp_path.iterdir()) == []


def test_a_finished_read_goes_back_to_its_partial_name_for_the_retry(tmp_path: Path) -> None:
    """One disk finished, the export then failed transiently: the retry reads that disk
    from the disk, checked, and fetches nothing; a failure that is not transient removes
    the finished file and its mark."""
    target = tmp_path / "disk.raw"
    _read(target, Source())
    keep_for_retry([target], Transient("the other disk was throttled"))
    assert not target.exists() and partial_path(target).exists()
    again = Source()
    _read(target, again)
    assert again.fetched == []
    assert target.read_bytes() == DATA

    keep_for_retry([target], VerificationError("the other disk lied"))
    assert list(tmp_path.iterdir()) == []
