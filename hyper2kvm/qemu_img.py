"""qemu-img, run as a child that dies with us and never leaves a half-written output."""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from core.errors import ConversionError

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_PR_SET_PDEATHSIG = 1
COROUTINES = 16

ProgressCallback = Callable[[float], None]  # percent done, 0..100


@dataclass(frozen=True)
class DiskSource:
    """A disk image, or a disk stored inside another file (an OVA member) at an offset."""

    path: Path
    format: str | None = None
    offset: int = 0
    size: int | None = None

    def spec(self) -> str:
        """The name qemu-img opens: a plain path, or a json: spec reading a byte range."""
        if not self.offset and self.size is None:
            return str(self.path)
        inner: dict[str, Any] = {
            "driver": "raw",
            "offset": self.offset,
            "file": {"driver": "file", "filename": str(self.path)},
        }
        if self.size is not None:
            inner["size"] = self.size
        return "json:" + json.dumps({"driver": self.format or "raw", "file": inner})

    def format_args(self) -> list[str]:
        if self.format and not (self.offset or self.size is not None):
            return ["-f", self.format]
        return []


def _die_with_parent() -> None:
    """Runs in the child: if our process dies (a cancelled flow run), qemu-img dies too."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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
    """Convert `source` into `target`. On any failure or interruption qemu-img is killed
    and `target` removed: callers pass a partial name and rename it once all is done."""
    # 16 parallel coroutines instead of 8: measurably faster here on streamOptimized
    # sources (bench/convert.py); -W (out-of-order writes) was not.
    cmd = [QEMU_IMG, "convert", "-p", "-m", str(COROUTINES), "-O", output_format,
           *source.format_args()]
    if output_format == "qcow2" and compress:
        cmd.append("-c")
        if supports_zstd():
            cmd += ["-o", "compression_type=zstd"]
    if subformat:
        cmd += ["-o", f"subformat={subformat}"]
    if preallocation:
        cmd += ["-o", f"preallocation={preallocation}"]
    cmd += [source.spec(), str(target)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    try:
        assert proc.stdout is not None
        buffer = b""
        while chunk := os.read(proc.stdout.fileno(), 4096):
            buffer = (buffer + chunk)[-256:]
            found = _PROGRESS.findall(buffer)
            if found and progress:
                progress(float(found[-1]))
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise ConversionError(
                f"qemu-img convert of {source.path.name} failed: {stderr.strip()}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        target.unlink(missing_ok=True)
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

