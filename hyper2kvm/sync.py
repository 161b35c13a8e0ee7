"""Bring an output image up to date with a disk that keeps changing: the generic round of
a warm migration, for sources that report no changed blocks of their own (a local image a
running VM writes to).

The source is served read-only by qemu-nbd with `force-share=on` (a running QEMU holds the
image's write lock; we only read). A round walks the blocks that hold data in the source
or in the copy (NBD `base:allocation`, holes and zero extents skipped on both sides),
compares them, and writes only those that differ; a block that became zero is zeroed. The
copy therefore equals the source as it was read, block by block: exact once the source
stops changing (the final round, after the VM is off).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd

from core.errors import ConversionError
from hyper2kvm.output import (
    QEMU_NBD,
    OutputImage,
    data_extents,
    nbd_client,
    private_socket_dir,
    stop_process,
    wait_for_socket,
)

BLOCK = 1 << 20  # compared and written at once


def blocks_of(extents: list[tuple[int, int]], size: int) -> list[int]:
    """The BLOCK-aligned offsets that the extents touch, in order, each once."""
    offsets: set[int] = set()
    for start, length in extents:
        first = start // BLOCK * BLOCK
        offsets.update(range(first, min(start + length, size), BLOCK))
    return sorted(offsets)


@contextmanager
def read_only(image: Path, image_format: str) -> Iterator[nbd.NBD]:
    """The image as a read-only NBD disk (shared with a QEMU that writes it), with its
    allocation map."""
    folder = private_socket_dir("hypersdk-src-")
    socket, log = folder / "src.sock", folder / "qemu-nbd.log"
    with log.open("wb") as errors:
        server = subprocess.Popen(
            [QEMU_NBD, "--read-only", "--socket", str(socket), "--image-opts",
             f"driver={image_format},force-share=on,read-only=on,file.driver=file,"
             f"file.filename={str(image).replace(',', ',,')}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        wait_for_socket(socket, server, f"qemu-nbd for {image.name}", log=log)
        handle = nbd_client(socket)
        yield handle
        handle.shutdown()
    finally:
        stop_process(server)
        for path in (socket, log):
            path.unlink(missing_ok=True)
        folder.rmdir()


def sync_into(source: nbd.NBD, output: OutputImage, *,
              progress: Callable[[int], None] | None = None) -> int:
    """One round: every block where `output` differs from `source` written (or zeroed);
    the bytes that changed. `progress` gets the bytes compared."""
    size = output.size
    if source.get_size() != size:
        raise ConversionError(f"{output.target.name}: the source is {source.get_size()} "
                              f"bytes now, the copy {size}; a disk resized while it is "
                              "copied warm needs a new migration")
    blocks = blocks_of(data_extents(source, size) + output.data_extents(), size)
    changed = 0
    for offset in blocks:
        length = min(BLOCK, size - offset)
        wanted = source.pread(length, offset)
        if wanted != output.read(offset, length):
            output.overwrite(offset, wanted)
            changed += length
        if progress:
            progress(length)
    return changed
