"""A stream-optimized VMDK read once, in order, as it arrives (an NFC export lease serves
one without `Range`), inflated into the disk's data at its offsets.

The layout (VMware's "Virtual Disk Format 1.1", stream-optimized sparse extents): the
sparse header in sector 0, the embedded descriptor, then from `overhead` sectors on a
sequence of sector-aligned markers. A marker with a size is a grain: its LBA and that
many bytes of deflated data (zlib) after the 12-byte marker head, padded to a sector. A
marker of size 0 is metadata of its type (end of stream, grain table, grain directory,
footer) followed by as many sectors as its value says, which a reader in order skips:
every grain says where it goes. Zero grains are simply absent. VMware's streams put
their grain tables after the grains and end with an end-of-stream marker; qemu-img's
put them before the first grain and end after the last one: there the tables say how
many grains must have come.

The input is hostile until proven otherwise: grains must lie inside the disk, inflate to
at most a grain, and come in increasing order; anything else is an error, never a write
past the disk or a decompression bomb.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from core.errors import VerificationError
from hyper2kvm.vmdk import GD_AT_END, SECTOR, SparseHeader, parse_header

Read = Callable[[int], bytes]  # exactly n bytes, or fewer only at the end of the stream
Write = Callable[[int, bytes], None]  # data at a byte offset of the disk

_MARKER = struct.Struct("<QI")
EOS, GRAIN_TABLE, GRAIN_DIRECTORY, FOOTER = 0, 1, 2, 3
COALESCE = 8 << 20  # adjacent grains handed to `write` together, up to this many bytes
_MAX_OVERHEAD = 256 << 20  # grain tables up front: 64 MiB per TiB of disk


class _Coalescer:
    """Adjacent grains joined into one write (a grain is 64 KiB; a write each would cost
    a round trip each)."""

    def __init__(self, write: Write) -> None:
        self.write = write
        self.start = 0
        self.parts: list[bytes] = []
        self.length = 0

    def add(self, offset: int, data: bytes) -> None:
        if self.parts and (offset != self.start + self.length
                           or self.length + len(data) > COALESCE):
            self.flush()
        if not self.parts:
            self.start = offset
        self.parts.append(data)
        self.length += len(data)

    def flush(self) -> None:
        if self.parts:
            self.write(self.start, b"".join(self.parts))
            self.parts, self.length = [], 0


def _exactly(read: Read, count: int, what: str) -> bytes:
    data = read(count)
    if len(data) != count:
        raise VerificationError(f"{what}: the stream ended inside a stream-optimized VMDK "
                                f"({len(data)} of {count} bytes)")
    return data


def inflate_stream(read: Read, write: Write, *, what: str = "disk",
                   on_header: Callable[[int], None] | None = None) -> int:
    """Read a stream-optimized VMDK from `read` to its end-of-stream marker, writing each
    grain's data at its offset with `write` (in increasing order). `on_header` is told the
    disk's capacity in bytes before the first write. Returns the capacity."""
    header = parse_header(_exactly(read, SECTOR, what))
    if not (header.compressed and header.has_markers):
        raise VerificationError(f"{what}: not a stream-optimized VMDK (no compressed grains "
                                "with markers)")
    capacity = header.capacity_sectors * SECTOR
    grain_bytes = header.grain_size_sectors * SECTOR
    if on_header:
        on_header(capacity)
    skip = header.overhead_sectors * SECTOR - SECTOR
    if skip < 0:
        raise VerificationError(f"{what}: its header puts the data before the header's end")
    metadata_up_front = header.grain_directory_offset != GD_AT_END
    if metadata_up_front and skip > _MAX_OVERHEAD:
        raise VerificationError(f"{what}: {skip} bytes of metadata before the first grain")
    overhead = bytearray()
    while skip:  # the embedded descriptor (and grain tables, if written up front)
        step = min(skip, 1 << 20)
        chunk = _exactly(read, step, what)
        if metadata_up_front:
            overhead += chunk
        skip -= step
    expected = _allocated_grains(header, bytes(overhead), what) if metadata_up_front else None
    coalesced = _Coalescer(write)
    next_offset = 0
    grains = 0
    while True:
        marker = read(SECTOR)
        if not marker and expected is not None:
            # qemu-img's streams end after the last grain, their tables up front: the
            # body ended where the server said it does, with every grain they list
            if grains != expected:
                raise VerificationError(f"{what}: the stream ended after {grains} grains; "
                                        f"its grain tables list {expected}")
            coalesced.flush()
            return capacity
        if len(marker) != SECTOR:
            raise VerificationError(f"{what}: the stream ended inside a stream-optimized "
                                    f"VMDK, before its end-of-stream marker")
        value, size = _MARKER.unpack_from(marker)
        if size == 0:
            (kind,) = struct.unpack_from("<I", marker, _MARKER.size)
            if kind == EOS:
                coalesced.flush()
                return capacity
            if kind not in (GRAIN_TABLE, GRAIN_DIRECTORY, FOOTER):
                raise VerificationError(f"{what}: unknown marker type {kind}")
            remaining = value * SECTOR
            while remaining:
                step = min(remaining, 1 << 20)
                _exactly(read, step, what)
                remaining -= step
            continue
        if size > grain_bytes + 1024:  # deflate never grows data by more than a little
            raise VerificationError(f"{what}: a grain of {size} compressed bytes")
        padded = -(-(_MARKER.size + size) // SECTOR) * SECTOR
        body = marker[_MARKER.size:] + (_exactly(read, padded - SECTOR, what)
                                        if padded > SECTOR else b"")
        offset = value * SECTOR
        if offset % grain_bytes or offset < next_offset or offset >= capacity:
            raise VerificationError(f"{what}: a grain at sector {value} is out of order, "
                                    "misaligned or past the disk's end")
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(body[:size], min(grain_bytes, capacity - offset))
        except zlib.error as exc:
            raise VerificationError(f"{what}: the grain at sector {value} does not "
                                    f"inflate: {exc}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise VerificationError(f"{what}: the grain at sector {value} inflates to more "
                                    "than a grain, or is cut short")
        coalesced.add(offset, data)
        next_offset = offset + len(data)
        grains += 1


def _allocated_grains(header: SparseHeader, overhead: bytes, what: str) -> int:
    """How many grains the grain tables written before the first grain list (`overhead`:
    the bytes from sector 1 to the first marker)."""
    grains_total = -(-header.capacity_sectors // header.grain_size_sectors)
    tables = -(-grains_total // header.grain_table_entries)

    def words(sector: int, count: int) -> tuple[int, ...]:
        start = (sector - 1) * SECTOR
        if sector < 1 or start + 4 * count > len(overhead):
            raise VerificationError(f"{what}: its grain tables lie outside its metadata")
        return struct.unpack_from(f"<{count}I", overhead, start)

    allocated = 0
    for table in words(header.grain_directory_offset, tables):
        if table:
            allocated += sum(1 for entry in words(table, header.grain_table_entries)
                             if entry > 1)
    return allocated
