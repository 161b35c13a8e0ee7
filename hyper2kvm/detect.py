"""Disk image formats told apart by their first bytes, as qemu-img's probes do."""

from __future__ import annotations

from pathlib import Path

_MAGIC: list[tuple[int, bytes, str]] = [
    (0, b"KDMV", "vmdk"),  # sparse extent (monolithicSparse, streamOptimized)
    (0, b"QFI\xfb", "qcow2"),
    (0, b"conectix", "vpc"),  # VHD (dynamic/differencing; fixed VHDs keep it in the footer)
    (0, b"vhdxfile", "vhdx"),
    (0, b"# Disk DescriptorFile", "vmdk"),  # text descriptor
]


def detect_format(path: Path, *, offset: int = 0) -> str:
    """'vmdk', 'qcow2', 'vpc', 'vhdx' or 'raw'."""
    with path.open("rb") as stream:
        stream.seek(offset)
        head = stream.read(64)
    for at, magic, name in _MAGIC:
        if head[at : at + len(magic)] == magic:
            return name
    return "raw"
