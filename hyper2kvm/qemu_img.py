"""qemu-img, run as a child that dies with us and never leaves a half-written output."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

from core.errors import ConversionError, InvalidRequest
from core.process import die_with_parent
from hyper2kvm.vmdk import SECTOR, parse_header

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")

ProgressCallback = Callable[[float], None]  # percent done, 0..100


@dataclass(frozen=True)
class DiskSource:
    """A disk image, or a disk stored inside another file (an OVA member) at an offset."""

    path: Path
    format: str | None = None
    offset: int = 0
    size: int | None = None
    # how qemu reads the file: its thread pool or io_uring; None lets convert() choose
    aio: Literal["threads", "io_uring"] | None = None

    def _plain(self) -> bool:
        return not self.offset and self.size is None and self.aio is None

    def spec(self) -> str:
        """The name qemu-img opens: a plain path, or a json: spec reading a byte range or
        naming the I/O engine."""
        if self._plain():
            return str(self.path)
        file: dict[str, Any] = {"driver": "file", "filename": str(self.path)}
        if self.aio:
            file["aio"] = self.aio
        if self.offset or self.size is not None:
            file = {"driver": "raw", "offset": self.offset, "file": file}
            if self.size is not None:
                file["size"] = self.size
        return "json:" + json.dumps({"driver": self.format or "raw", "file": file})

    def format_args(self) -> list[str]:
        if self.format and self._plain():
            return ["-f", self.format]
        return []

    def is_stream_optimized(self) -> bool:
        """A VMDK whose grains are compressed (streamOptimized, what OVAs carry)."""
        if self.format != "vmdk":
            return False
        try:
            with self.path.open("rb") as stream:
                stream.seek(self.offset)
                return parse_header(stream.read(SECTOR)).compressed
        except (OSError, InvalidRequest):
            return False


@cache
def version() -> str | None:
    try:
        out = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"version (\S+)", out.stdout)
    return match.group(1) if match else out.stdout.strip()


def info(source: DiskSource | Path) -> dict[str, Any]:
    """`qemu-img info` as a dict (virtual-size, format, actual-size, ...)."""
    if isinstance(source, Path):
        source = DiskSource(source)
    cmd = [QEMU_IMG, "info", "--output=json", *source.format_args(), source.spec()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConversionError(f"qemu-img cannot read {source.path}: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@cache
def supports_io_uring() -> bool:
    """Whether this qemu-img, on this kernel, can read files through io_uring."""
    probe = {"driver": "raw", "file": {"driver": "file", "filename": __file__, "aio": "io_uring"}}
    done = subprocess.run([QEMU_IMG, "info", "--output=json", "json:" + json.dumps(probe)],
                          capture_output=True)
    return done.returncode == 0


def fastest_reader(source: DiskSource) -> DiskSource:
    """`source` as qemu-img reads it fastest, unless its I/O engine is set. qemu reads a
    stream-optimized VMDK one compressed grain (<= 64 KiB) at a time; through io_uring
    rather than its thread pool that converts 2-3x faster (bench/convert.py: 4 GiB,
    1.5-1.9 s against 5.0-6.8 s cold).
    Raw, flat and sparse sources, read in large requests, measured no better through
    io_uring, at times slower, so they keep qemu's default."""
    if source.aio is None and source.is_stream_optimized() and supports_io_uring():
        return replace(source, aio="io_uring")
    return source


@cache
def supports_zstd() -> bool:
    """Whether this qemu-img can write zstd-compressed qcow2."""
    done = subprocess.run(
        [QEMU_IMG, "create", "-f", "qcow2", "-o", "help", "/dev/null"],
        capture_output=True,
        text=True,
    )
    return "zstd" in done.stdout


def bytes_progress(total: int, report: Callable[[int], None]) -> ProgressCallback:
    """Turn qemu-img's percentages into byte increments of a `total`-byte disk."""
    seen = 0

    def on_percent(percent: float) -> None:
        nonlocal seen
        done = int(total * percent / 100)
        if done > seen:
            report(done - seen)
            seen = done

    return on_percent


def convert(
    source: DiskSource,
    target: Path,
    *,
    output_format: Literal["qcow2", "raw", "vmdk"],
    compress: bool = False,
    subformat: str | None = None,
    preallocation: str | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Convert `source` into `target`, reading it the fastest way (fastest_reader). On any
    failure or interruption qemu-img is killed and `target` removed: callers pass a
    partial name and rename it once all is done."""
    # qemu-img's own -m (8 coroutines) and in-order writes: -m 16 and -W measured no
    # faster on any source here (bench/convert.py), -W often slower
    source = fastest_reader(source)
    cmd = [QEMU_IMG, "convert", "-p", "-O", output_format, *source.format_args()]
    if output_format == "qcow2" and compress:
        cmd.append("-c")
        if supports_zstd():
            cmd += ["-o", "compression_type=zstd"]
    if subformat:
        cmd += ["-o", f"subformat={subformat}"]
    if preallocation:
        cmd += ["-o", f"preallocation={preallocation}"]
    cmd += [source.spec(), str(target)]
    try:
        _run_with_progress(cmd, source.path.name, progress)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def copy_into(source: str, target: str, *, progress: ProgressCallback | None = None,
              stop: threading.Event | None = None, what: str = "") -> None:
    """Copy the disk at `source` into the existing, empty disk at `target` (both URIs or
    file names qemu opens raw, e.g. NBD exports): zero blocks are skipped, not written.
    `stop` set → qemu-img killed and ConversionError raised."""
    _run_with_progress([QEMU_IMG, "convert", "-p", "-n", "--target-is-zero", "-f", "raw",
                        "-O", "raw", source, target], what or source, progress, stop)


def _run_with_progress(cmd: list[str], what: str, progress: ProgressCallback | None,
                       stop: threading.Event | None = None) -> None:
    """qemu-img `cmd` (with -p), its percentages to `progress`; killed on any failure,
    interruption, or `stop`."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,  # a cancelled flow run takes qemu-img along
    )
    try:
        assert proc.stdout is not None
        buffer = b""
        while True:
            if stop is not None and stop.is_set():
                raise ConversionError(f"qemu-img convert of {what}: stopped")
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer = (buffer + chunk)[-256:]
            found = _PROGRESS.findall(buffer)
            if found and progress:
                progress(float(found[-1]))
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise ConversionError(f"qemu-img convert of {what} failed: {stderr.strip()}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def check(image: Path, fmt: str = "qcow2") -> None:
    """`qemu-img check`: refuse an image with corruptions (leaked clusters are harmless)."""
    done = subprocess.run([QEMU_IMG, "check", "-f", fmt, "--output=json", str(image)],
                          capture_output=True, text=True)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise ConversionError(f"qemu-img check of {image.name} failed: "
                              f"{done.stderr.strip()}") from None
    if report.get("corruptions", 0) or report.get("check-errors", 0):
        raise ConversionError(f"{image.name}: qemu-img check found "
                              f"{report.get('corruptions', 0)} corruption(s)")


def compare(first: Path, second: Path) -> bool:
    """Whether two images hold the same guest-visible content."""
    done = subprocess.run([QEMU_IMG, "compare", str(first), str(second)], capture_output=True)
    if done.returncode in (0, 1):
        return done.returncode == 0
    raise ConversionError(f"qemu-img compare failed: {done.stderr.decode(errors='replace')}")


def create(image: Path, fmt: str, size: int) -> None:
    """A new, empty image of `size` bytes."""
    done = subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(image), str(size)],
                          capture_output=True, text=True, preexec_fn=die_with_parent)
    if done.returncode != 0:
        raise ConversionError(f"qemu-img could not create {image.name}: {done.stderr.strip()}")


def create_overlay(overlay: Path, backing: Path, backing_format: str) -> None:
    """A qcow2 that reads from `backing` and takes every write itself."""
    done = subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", backing_format, "-b",
         str(backing.resolve()), str(overlay)],
        capture_output=True, text=True, preexec_fn=die_with_parent)
    if done.returncode != 0:
        raise ConversionError(f"qemu-img could not make an overlay of {backing.name}: "
                              f"{done.stderr.strip()}")
