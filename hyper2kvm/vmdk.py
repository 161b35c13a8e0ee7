"""VMDK metadata, read by our own code: the text descriptor (standalone or embedded in a
sparse extent), the sparse extent header, the extents and the CID/parentCID chain."""

from __future__ import annotations

import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InvalidRequest

SECTOR = 512
MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
# VMware's "Virtual Disk Format 1.1": the fields of a hosted sparse extent header
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MAX_DESCRIPTOR = 1 << 20
_EXTENT = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(SPARSE|FLAT|ZERO|VMFS|VMFSSPARSE|VMFSRDM|VMFSRAW)'
    r'(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$', re.IGNORECASE)
_KEY_VALUE = re.compile(r'^([A-Za-z0-9_.]+)\s*=\s*"?([^"]*)"?\s*$')
COMPRESSION = {0: "none", 1: "deflate"}


@dataclass(frozen=True)
class SparseHeader:
    version: int
    flags: int
    capacity_sectors: int
    grain_size_sectors: int
    descriptor_offset: int
    descriptor_size: int
    grain_table_entries: int
    grain_directory_offset: int
    overhead_sectors: int
    unclean_shutdown: bool
    compression: str

    @property
    def compressed(self) -> bool:
        return bool(self.flags & (1 << 16))

    @property
    def has_markers(self) -> bool:
        return bool(self.flags & (1 << 17))


@dataclass(frozen=True)
class Extent:
    access: str
    sectors: int
    kind: str
    file: str | None
    offset: int = 0


@dataclass
class VmdkInfo:
    create_type: str
    cid: str | None
    parent_cid: str | None
    parent_hint: str | None
    adapter_type: str | None
    hw_version: str | None
    geometry: tuple[int, int, int] | None  # cylinders, heads, sectors
    extents: list[Extent]
    header: SparseHeader | None = None
    ddb: dict[str, str] = field(default_factory=dict)

    @property
    def capacity_bytes(self) -> int:
        return sum(e.sectors for e in self.extents) * SECTOR

    @property
    def has_parent(self) -> bool:
        return self.parent_cid not in (None, "ffffffff")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(capacity_bytes=self.capacity_bytes, has_parent=self.has_parent)
        return data


def parse_header(raw: bytes) -> SparseHeader:
    """The sparse extent header at the start of `raw`."""
    if len(raw) < _HEADER.size or raw[:4] != MAGIC:
        raise InvalidRequest("not a VMDK sparse extent (no KDMV magic)")
    (_, version, flags, capacity, grain, desc_offset, desc_size, gtes, _rgd, gd, overhead,
     unclean, _newlines, compression) = _HEADER.unpack_from(raw)
    if grain == 0 or grain & (grain - 1):
        raise InvalidRequest(f"VMDK header: grain size {grain} is not a power of two")
    return SparseHeader(
        version=version, flags=flags, capacity_sectors=capacity, grain_size_sectors=grain,
        descriptor_offset=desc_offset, descriptor_size=desc_size, grain_table_entries=gtes,
        grain_directory_offset=gd, overhead_sectors=overhead, unclean_shutdown=bool(unclean),
        compression=COMPRESSION.get(compression, f"unknown({compression})"))


def _cid(value: str | None) -> str | None:
    """A content id as 8 hex digits (writers differ in zero padding and case)."""
    if not value:
        return None
    try:
        return f"{int(value, 16):08x}"
    except ValueError:
        raise InvalidRequest(f"VMDK descriptor: CID {value!r} is not hexadecimal") from None


def parse_descriptor(text: str) -> VmdkInfo:
    """A text descriptor ('# Disk DescriptorFile')."""
    values: dict[str, str] = {}
    extents: list[Extent] = []
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip().strip("\x00")
        if not line or line.startswith("#"):
            continue
        extent = _EXTENT.match(line)
        if extent:
            access, sectors, kind, name, offset = extent.groups()
            extents.append(Extent(access.upper(), int(sectors), kind.upper(), name,
                                  int(offset or 0)))
            continue
        pair = _KEY_VALUE.match(line)
        if not pair:
            raise InvalidRequest(f"VMDK descriptor line {number} is not understood: {line!r}")
        values[pair.group(1)] = pair.group(2)
    if "createType" not in values:
        raise InvalidRequest("VMDK descriptor has no createType")
    if not extents:
        raise InvalidRequest("VMDK descriptor lists no extents")
    geometry = None
    if all(f"ddb.geometry.{k}" in values for k in ("cylinders", "heads", "sectors")):
        geometry = (int(values["ddb.geometry.cylinders"]), int(values["ddb.geometry.heads"]),
                    int(values["ddb.geometry.sectors"]))
    return VmdkInfo(
        create_type=values["createType"],
        cid=_cid(values.get("CID")),
        parent_cid=_cid(values.get("parentCID")),
        parent_hint=values.get("parentFileNameHint"),
        adapter_type=values.get("ddb.adapterType"),
        hw_version=values.get("ddb.virtualHWVersion"),
        geometry=geometry,
        extents=extents,
        ddb={k: v for k, v in values.items() if k.startswith("ddb.")},
    )


def _read_descriptor(stream: Any, start: int, size: int | None) -> tuple[str, SparseHeader | None]:
    stream.seek(start)
    head = stream.read(SECTOR)
    if head[:4] == MAGIC:
        header = parse_header(head)
        if not header.descriptor_offset or not header.descriptor_size:
            raise InvalidRequest("VMDK sparse extent holds no embedded descriptor")
        length = header.descriptor_size * SECTOR
        if length > _MAX_DESCRIPTOR:
            raise InvalidRequest(f"VMDK embedded descriptor of {length} bytes is too large")
        stream.seek(start + header.descriptor_offset * SECTOR)
        return stream.read(length).decode("utf-8", "replace"), header
    if not head.startswith(b"# Disk DescriptorFile"):
        raise InvalidRequest("not a VMDK: neither a sparse extent nor a text descriptor")
    limit = min(size or _MAX_DESCRIPTOR, _MAX_DESCRIPTOR)
    stream.seek(start)
    return stream.read(limit).decode("utf-8", "replace"), None


def extent_path(descriptor: Path, extent: Extent) -> Path:
    """Where an extent's file is; refused when it leaves the descriptor's folder."""
    if not extent.file:
        raise InvalidRequest(f"{extent.kind} extent names no file")
    folder = Path(os.path.realpath(descriptor.parent))
    target = Path(os.path.realpath(folder / extent.file))
    if Path(extent.file).is_absolute() or folder not in target.parents:
        raise InvalidRequest(f"{descriptor.name}: extent {extent.file!r} escapes its folder")
    return target


def parse_vmdk(path: Path, *, offset: int = 0, size: int | None = None,
               check_extents: bool = True) -> VmdkInfo:
    """Parse the VMDK at `path` (or stored at `offset` inside it, e.g. an OVA member).
    For a standalone descriptor, extent files are checked to stay in its folder and exist,
    and the first sparse extent's header is read."""
    try:
        with path.open("rb") as stream:
            text, header = _read_descriptor(stream, offset, size)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path.name}: {exc.strerror}") from None
    info = parse_descriptor(text)
    info.header = header
    if header and header.capacity_sectors and not info.capacity_bytes:
        info.extents = [Extent("RW", header.capacity_sectors, "SPARSE", path.name)]
    if header is None and check_extents and not offset:
        for extent in info.extents:
            if extent.kind == "ZERO":
                continue
            file = extent_path(path, extent)
            if not file.is_file():
                raise InvalidRequest(f"{path.name}: extent file {extent.file!r} is missing")
            if info.header is None and extent.kind in ("SPARSE", "VMFSSPARSE"):
                with file.open("rb") as stream:
                    info.header = parse_header(stream.read(SECTOR))
    return info
