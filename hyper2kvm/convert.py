"""Converting staged disks with qemu-img: each disk's checksum verified while qemu-img
reads it, outputs under their final names only once every disk is done, nothing left
behind on failure.

Outputs are not fsynced (bare qemu-img does not either): flushing cost ~40 % more time per
migration here (bench/job_path.py marginal ratio 1.10 -> 1.42), and a host crash in the
seconds before the kernel writes them back leaves a disk to convert again from an
untouched source. Backups, whose "completed" lets retention delete older ones, are
flushed (flows/backup_policy.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from core.errors import ConversionError, VerificationError
from core.files import partial_path
from core.models import ConvertedDisk
from core.paths import safe_name
from hyper2kvm import qemu_img
from hyper2kvm.manifest import digest_file
from hyper2kvm.staging import StagedDisk, StagedVM


class _Digest(threading.Thread):
    """Hashes a staged disk alongside the conversion."""

    def __init__(self, disk: StagedDisk) -> None:
        super().__init__(name=f"digest-{disk.path.name}", daemon=True)
        self.disk = disk
        self.actual: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            assert self.disk.algorithm
            self.actual = digest_file(self.disk.path, algorithm=self.disk.algorithm,
                                      offset=self.disk.offset, length=self.disk.size)
        except BaseException as exc:  # noqa: BLE001 - handed to the converting thread
            self.error = exc

    def check(self) -> None:
        self.join()
        if self.error:
            raise self.error
        if self.actual != self.disk.digest:
            raise VerificationError(
                f"{self.disk.disk.file or self.disk.path.name}: {self.disk.algorithm} "
                f"{self.actual} does not match the manifest's {self.disk.digest}")


def changed_outputs(disks: list[ConvertedDisk]) -> str | None:
    """What no longer holds of converted disks (gone, another format or size, a backing
    or data file, qcow2 corruption), or None. Guest conversion may have written to them
    since; that step checks its own outputs."""
    for disk in disks:
        if not disk.path.is_file():
            return f"{disk.path} is gone"
        try:
            facts = qemu_img.info(disk.path)
            if disk.format == "qcow2":
                qemu_img.check(disk.path)
        except ConversionError as exc:
            return f"{disk.path.name}: {exc}"
        if facts.get("format") != disk.format or facts.get("virtual-size") != disk.virtual_size:
            return (f"{disk.path.name} is {facts.get('format')} of {facts.get('virtual-size')} "
                    f"bytes, not the {disk.format} of {disk.virtual_size} converted")
        if "backing-filename" in facts or facts.get("format-specific", {}).get(
                "data", {}).get("data-file"):
            return f"{disk.path.name} has a backing or data file now"
    return None


def output_paths(vm_name: str, count: int, folder: Path, fmt: str) -> list[Path]:
    """Where each of a VM's `count` disks lands: <folder>/<vm>-disk<N>.<fmt>."""
    name = safe_name(vm_name)
    return [folder / f"{name}-disk{i}.{fmt}" for i in range(1, count + 1)]


PARALLEL_DISKS = 2  # disks of one VM converted at once


def _convert_one(disk: StagedDisk, size: int, target: Path, partial: Path, *,
                 output_format: Literal["qcow2", "raw"], compress: bool,
                 preallocation: str | None, checksum: bool,
                 progress: Callable[[int], None] | None) -> ConvertedDisk:
    started = time.monotonic()
    digest = _Digest(disk) if disk.digest else None
    if digest:
        digest.start()
    qemu_img.convert(disk.source(), partial, output_format=output_format, compress=compress,
                     preallocation=preallocation,
                     progress=qemu_img.bytes_progress(size, progress) if progress else None)
    if digest:
        digest.check()
    if output_format == "qcow2":
        qemu_img.check(partial)
    facts = qemu_img.info(qemu_img.DiskSource(partial, output_format))
    return ConvertedDisk(
        source=disk.disk.file or disk.path.name, path=target, format=output_format,
        virtual_size=facts["virtual-size"], actual_size=facts.get("actual-size", 0),
        seconds=round(time.monotonic() - started, 3),
        verified=disk.algorithm if digest else None,
        sha256=digest_file(partial) if checksum else None)


def convert_staged(
    staged: StagedVM,
    folder: Path,
    *,
    output_format: Literal["qcow2", "raw"],
    compress: bool = False,
    preallocation: str | None = None,
    checksum: bool = False,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ConvertedDisk]:
    """Convert every disk of `staged` into `folder`, up to PARALLEL_DISKS at once; qcow2
    outputs pass `qemu-img check`; with `checksum`, each output's SHA-256 is recorded.
    `on_start` is told the total virtual bytes, `progress`
    the bytes converted as they go. Outputs get their final names only when all are done."""
    targets = output_paths(staged.vm.name, len(staged.disks), folder, output_format)
    sizes = [d.disk.capacity_bytes or qemu_img.info(d.source())["virtual-size"]
             for d in staged.disks]
    if on_start:
        on_start(sum(sizes))
    created_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    partials = [partial_path(t) for t in targets]
    try:
        with ThreadPoolExecutor(max_workers=min(PARALLEL_DISKS, len(targets)),
                                thread_name_prefix="convert") as pool:
            futures = [pool.submit(_convert_one, disk, size, target, partial,
                                   output_format=output_format, compress=compress,
                                   preallocation=preallocation, checksum=checksum,
                                   progress=progress)
                       for disk, size, target, partial
                       in zip(staged.disks, sizes, targets, partials, strict=True)]
            converted = [future.result() for future in futures]
        for partial, target in zip(partials, targets, strict=True):
            os.replace(partial, target)
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        if created_folder and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return converted
