"""Disk image formats told apart by their first bytes, as qemu-img's probes do, and a
file's name checked against its content: a format is checked, never believed."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import InvalidRequest

_MAGIC: list[tuple[int, bytes, str]] = [
    (0, b"KDMV", "vmdk"),  # sparse extent (monolithicSparse, streamOptimized)
    (0, b"QFI\xfb", "qcow2"),
    (0, b"conectix", "vpc"),  # VHD (dynamic/differencing; fixed VHDs keep it in the footer)
    (0, b"vhdxfile", "vhdx"),
    (0, b"# Disk DescriptorFile", "vmdk"),  # text descriptor
]
# what a file that is no disk image often is, for an error message that says so
_OTHER: list[tuple[int, bytes, str]] = [
    (0, b"\x1f\x8b", "gzip data"),
    (0, b"\xfd7zXZ\x00", "xz data"),
    (0, b"BZh", "bzip2 data"),
    (0, b"PK\x03\x04", "a zip archive"),
    (0, b"\x7fELF", "an ELF executable"),
    (257, b"ustar", "a tar archive"),
    (0x8001, b"CD001", "an ISO 9660 image"),
]
# the format a file's extension claims; '.img' is raw or any image format it turns out
# to be (cloud images are qcow2 named .img)
CLAIMED_BY_SUFFIX = {".vmdk": "vmdk", ".qcow2": "qcow2", ".raw": "raw", ".img": "raw",
                     ".vhd": "vpc", ".vhdx": "vhdx"}
SECTOR = 512
_NAMES = {"vmdk": "a VMDK", "qcow2": "a qcow2 image", "vpc": "a VHD", "vhdx": "a VHDX",
          "raw": "a raw disk"}


def detect_format(path: Path, *, offset: int = 0, size: int | None = None) -> str:
    """'vmdk', 'qcow2', 'vpc', 'vhdx' or 'raw' (no signature found). A fixed VHD is found
    by its footer when `size` (or the file's size) says where that is."""
    with path.open("rb") as stream:
        stream.seek(offset)
        head = stream.read(64)
        for at, magic, name in _MAGIC:
            if head[at : at + len(magic)] == magic:
                return name
        end = offset + (size if size is not None else os.fstat(stream.fileno()).st_size - offset)
        if end - offset >= SECTOR:
            stream.seek(end - SECTOR)
            if stream.read(8) == b"conectix":
                return "vpc"
    return "raw"


def what_it_is(path: Path, *, offset: int = 0) -> str:
    """A few words on what an unrecognised file holds ('gzip data', 'text', ...)."""
    with path.open("rb") as stream:
        stream.seek(offset)
        head = stream.read(0x8010)
    for at, magic, name in _OTHER:
        if head[at : at + len(magic)] == magic:
            return name
    sample = head[:4096]
    if sample and all(32 <= b < 127 or b in b"\t\r\n" for b in sample):
        return "text"
    return "data with no disk image signature"


def claimed_format(name: str) -> str | None:
    """The format a file name claims by its extension, or None."""
    return CLAIMED_BY_SUFFIX.get(Path(name).suffix.lower())


def checked_format(path: Path, *, claimed: str | None, offset: int = 0,
                   size: int | None = None, name: str | None = None) -> str:
    """The format of the disk at `path` (or inside it at `offset`), refused with a message
    naming the file and what it really is unless it is what it `claimed`. A raw disk must
    be claimed raw ('.raw', '.img' or an explicit format) and hold whole sectors."""
    label = name or path.name
    actual = detect_format(path, offset=offset, size=size)
    img_suffix = Path(label).suffix.lower() == ".img"
    if actual != "raw":
        if claimed in (None, actual) or (claimed == "raw" and img_suffix):
            return actual
        raise InvalidRequest(f"{label} claims to be {_NAMES.get(claimed, claimed)} but is "
                             f"{_NAMES[actual]}")
    if claimed != "raw":
        wanted = (f"claims to be {_NAMES.get(claimed, claimed)}" if claimed
                  else "has no disk image extension (.vmdk, .qcow2, .vhd, .vhdx, .raw, .img)")
        raise InvalidRequest(f"{label} {wanted} but is {what_it_is(path, offset=offset)}")
    length = size if size is not None else path.stat().st_size - offset
    if length % SECTOR:
        raise InvalidRequest(f"{label}: a raw disk holds whole 512-byte sectors; "
                             f"{length} bytes is not a multiple of 512")
    return "raw"
