"""The one writer into an output image, for the one-pass path (export and conversion in
one pass over the bytes).

An `OutputImage` is a new qcow2 or raw image under a partial name, served for writing by
`qemu-nbd` on a unix socket in a private (0700) folder, so no other local user can
reach it. It is fed either

* by an NBD source copied with `qemu-img convert -n` (`copy_from`): a disk that serves
  random reads, such as nbdkit's curl plugin over a file that answers HTTP ranges, or
* by writes at offsets through libnbd (`write`): a stream our code decodes (a
  stream-optimized VMDK from an NFC lease); the shared ranged reader's parts could feed
  it the same way (not wired yet).

Holes are never written: the image starts empty, qemu-img turns zero blocks of the
source into nothing (`--target-is-zero`), `write` drops all-zero data. `finish` closes
the image (qemu-nbd writes its metadata on exit) and checks a qcow2 with `qemu-img
check`; `commit` gives it its final name; `discard` kills qemu-nbd and removes the
partial image. Like hyper2kvm.convert's, outputs are not fsynced (qemu-nbd's cache=unsafe).

Measured (two 1 GiB disks, half random, from vcsim, 2 cores): nbdkit's curl plugin
copied by `qemu-img convert` into this export 3.4-5.1 s, by nbdcopy with 8 MiB requests
3.0-4.9 s (but nbdcopy 1.14 reports progress only at 0 and 100 %), our own ranged HTTPS
reads in Python written through libnbd 4.6-5.6 s; two plain `curl`s to files 3.8-6.1 s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Self

import nbd

from core.errors import ConversionError
from core.files import all_zeros, partial_path
from hyper2kvm import qemu_img

QEMU_NBD = os.environ.get("QEMU_NBD", "qemu-nbd")


def private_socket_dir(prefix: str) -> Path:
    """A fresh folder only we can enter, for a server's unix socket."""
    return Path(tempfile.mkdtemp(prefix=prefix))  # mkdtemp makes it 0700


def wait_for_socket(socket: Path, process: subprocess.Popen[bytes], what: str, *,
                    log: Path, timeout: float = 30.0) -> None:
    """Until `process` listens on `socket`; its error output (`log`) if it exits first."""
    deadline = time.monotonic() + timeout
    while not socket.exists():
        if process.poll() is not None:
            err = log.read_text(errors="replace") if log.exists() else ""
            raise ConversionError(f"{what} did not start: {err.strip()}")
        if time.monotonic() > deadline:
            raise ConversionError(f"{what} did not listen within {timeout:.0f} s")
        time.sleep(0.01)


def nbd_client(socket: Path, *, timeout: float = 10.0) -> nbd.NBD:
    """A connection to the NBD server on `socket`, asking for its allocation map. The
    socket file exists from the server's bind, a moment before it listens: a refused
    connection is tried again (on a new handle: a failed one is dead)."""
    deadline = time.monotonic() + timeout
    while True:
        handle = nbd.NBD()
        handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            handle.connect_unix(str(socket))
            return handle
        except nbd.Error as exc:
            if exc.errno != errno.ECONNREFUSED or time.monotonic() > deadline:
                raise ConversionError(f"NBD server on {socket.name}: {exc}") from None
        time.sleep(0.01)


def stop_process(process: subprocess.Popen[bytes], *, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


_ZERO = 2  # NBD base:allocation: reads as zeros


def data_extents(handle: nbd.NBD, size: int) -> list[tuple[int, int]]:
    """(offset, length) of what does not read as zeros, per the server's allocation map
    (the handle asked for `base:allocation` before it connected)."""
    found: list[tuple[int, int]] = []
    entries: list[int] = []

    def collect(context: str, _start: int, pairs: list[int], _err: object) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            entries.extend(pairs)
        return 0

    offset = 0
    while offset < size:
        entries.clear()
        handle.block_status(min(size - offset, 1 << 30), offset, collect)
        if not entries:
            raise ConversionError(f"the NBD server reported no extents at {offset}")
        for length, flags in zip(entries[::2], entries[1::2], strict=True):
            length = min(length, size - offset)
            if not flags & _ZERO:
                found.append((offset, length))
            offset += length
    return found


class OutputImage:
    """One output disk being written: open → writes or copy_from → finish → commit, or
    discard on any failure."""

    def __init__(self, target: Path, *, output_format: Literal["qcow2", "raw"],
                 size: int) -> None:
        self.target = target
        self.partial = partial_path(target)
        self.format = output_format
        self.size = size
        self._folder: Path | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._handle: nbd.NBD | None = None
        self._finished = False

    @property
    def socket(self) -> Path:
        assert self._folder is not None, "open() first"
        return self._folder / "out.sock"

    @property
    def log(self) -> Path:
        assert self._folder is not None, "open() first"
        return self._folder / "qemu-nbd.log"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def open(self, *, again: bool = False) -> Self:
        """Serve a new partial image for writing; `again`: the partial an earlier round
        of this job finished (a warm migration's copy), to write more into."""
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if again and not self.partial.is_file():
            raise ConversionError(f"{self.partial} is gone; the warm copy must start over")
        if not again and self.partial.exists():  # the target itself is replaced
            raise ConversionError(f"{self.target} is being written by another job")
        self._finished = False
        try:
            if not again:
                qemu_img.create(self.partial, self.format, self.size)
            self._folder = private_socket_dir("hypersdk-out-")
            with self.log.open("wb") as errors:
                # no --persistent: qemu-nbd exits once its last client is gone, so our
                # connection, held from here to finish(), is its lifeline (a parent-death
                # signal would follow the opening thread, which may be a pool's)
                self._server = subprocess.Popen(
                    [QEMU_NBD, "--socket", str(self.socket), "--format", self.format,
                     "--cache", "unsafe", "--shared", "8",
                     str(self.partial)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            wait_for_socket(self.socket, self._server, f"qemu-nbd for {self.target.name}",
                            log=self.log)
            self._handle = nbd_client(self.socket)
        except BaseException:
            if again:
                self.close()
            else:
                self.discard()
            raise
        return self

    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset` (threads may call at once); all-zero data is a hole."""
        if offset < 0 or offset + len(data) > self.size:
            raise ConversionError(f"{self.target.name}: a write at {offset} of {len(data)} "
                                  f"bytes runs past the disk's {self.size} bytes")
        if not data or all_zeros(data):
            return
        assert self._handle is not None, "open() first"
        try:
            self._handle.pwrite(data, offset)
        except nbd.Error as exc:
            raise ConversionError(f"{self.target.name}: write at {offset} failed: "
                                  f"{exc}") from None

    def overwrite(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset` over what the image holds: all-zero data zeroes."""
        if all_zeros(data):
            self.zero(offset, len(data))
        else:
            self.write(offset, data)

    def read(self, offset: int, length: int) -> bytes:
        assert self._handle is not None, "open() first"
        return bytes(self._handle.pread(length, offset))

    def zero(self, offset: int, length: int) -> None:
        """Make `length` bytes at `offset` read as zeros (a hole where the format can)."""
        assert self._handle is not None, "open() first"
        self._handle.zero(length, offset)

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of what the image holds that does not read as zeros."""
        assert self._handle is not None, "open() first"
        return data_extents(self._handle, self.size)

    def copy_from(self, source: str, *, progress: Callable[[float], None] | None = None,
                  stop: threading.Event | None = None, what: str = "") -> None:
        """Copy the disk at `source` (an NBD URI) into the image: `qemu-img convert -n`
        into our export, zero blocks skipped; `progress` gets its percent; `stop` set →
        qemu-img killed and ConversionError raised."""
        qemu_img.copy_into(source, self.uri, progress=progress, stop=stop,
                           what=what or self.target.name)

    def finish(self) -> dict[str, int]:
        """Close the image (qemu-nbd writes its metadata), check a qcow2; its virtual and
        actual sizes. It keeps its partial name until `commit`."""
        assert self._handle is not None and self._server is not None, "open() first"
        self._handle.shutdown()
        self._handle = None  # the last client gone: qemu-nbd closes the image and exits
        try:
            code = self._server.wait(60)
        except subprocess.TimeoutExpired:
            code = stop_process(self._server)
        if code != 0:
            err = self.log.read_text(errors="replace")
            raise ConversionError(f"qemu-nbd for {self.target.name} exited {code}: {err.strip()}")
        self._finished = True
        if self.format == "qcow2":
            qemu_img.check(self.partial)
        facts = qemu_img.info(qemu_img.DiskSource(self.partial, self.format))
        return {"virtual_size": int(facts["virtual-size"]),
                "actual_size": int(facts.get("actual-size", 0))}

    def close(self) -> None:
        """Stop serving the image and keep its partial (what a warm round wrote is kept
        for the next): qemu-nbd is let go cleanly, so a qcow2's metadata is written."""
        if self._handle is not None:
            with contextlib.suppress(nbd.Error):
                self._handle.shutdown()
            self._handle = None
        if self._server is not None:
            stop_process(self._server, timeout=60)
            self._server = None
        self._cleanup_folder()

    def commit(self) -> None:
        if not self._finished:
            raise ConversionError(f"{self.target.name} is not finished")
        os.replace(self.partial, self.target)
        self._cleanup_folder()

    def discard(self) -> None:
        """Stop writing and remove the partial image."""
        self._handle = None  # libnbd closes the connection when the handle goes
        if self._server is not None and self._server.poll() is None:
            self._server.kill()
            self._server.wait()
        self.partial.unlink(missing_ok=True)
        self._cleanup_folder()

    def _cleanup_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
